"""`zephyr_run.json`: what a finished `zephyr sft` / `zephyr dpo` run records about itself, as one type.

The training stage writes it into the model folder at its final save; the model card, `zephyr eval prefs` (which
reproduces the run's last eval from it) and a resume (which compares fingerprints) read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zephyr.errors import ZephyrError

RECORD_FILE = "zephyr_run.json"


@dataclass
class RunRecord:
    stage: str  # "sft" or "dpo"
    config: dict[str, Any]  # the recipe as the run resolved it (zephyr.config.config_to_dict)
    log_history: list[dict[str, Any]]  # every metrics.jsonl record, training and eval
    base_model: str | None = None  # model_name_or_path
    reference_model: str | None = None  # DPO: what the rewards are measured against
    num_processes: int | None = None  # None in records older than the count
    distributed_type: str = "NO"
    total_train_batch_size: int | None = None
    total_eval_batch_size: int | None = None
    parameter_share_per_process: float = 1.0  # ~1/N when sharded over N processes
    mixed_precision: str = "no"
    framework_versions: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None  # zephyr.train.run_folder.fingerprint
    zephyr_version: str | None = None  # the writer's version (None in records older than the field)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / RECORD_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1, default=str), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord:
        """FOLDER's record; a ZephyrError that says what is wrong when it is missing or not a Zephyr run record.
        Keys this version does not know (written by a newer Zephyr) are ignored."""
        path = Path(folder) / RECORD_FILE
        if not path.is_file():
            raise ZephyrError(
                f"{folder} has no {RECORD_FILE}, so it is not the output of a `zephyr sft` or `zephyr dpo` run; give "
                "the output folder of such a run (its output_dir)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ZephyrError(f"{path} cannot be read ({err}); rerun the training to write it again") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ZephyrError(
                f"{path} is not valid JSON ({err}); rerun the training to write it again"
            ) from err
        if not isinstance(data, dict):
            raise ZephyrError(f"{path} is not a Zephyr run record (not a JSON object)")
        for key, kind in (("stage", str), ("config", dict), ("log_history", list)):
            if not isinstance(data.get(key), kind):
                raise ZephyrError(
                    f"{path} has no valid '{key}'; it is not a Zephyr run record (rerun the training)"
                )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
