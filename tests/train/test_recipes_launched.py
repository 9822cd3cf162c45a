"""The Zephyr-7B recipes run as their READMEs launch them: the one-node `accelerate launch` command of each
recipe's README, read from the README itself, on 2 CPU processes under DeepSpeed ZeRO-3, to the end.

Only what a CPU test must change is overridden: the model (a tiny random MistralForCausalLM, the class of
Mistral-7B, with grouped-query attention and an untied head), the data (tiny local files in the schemas of
HuggingFaceH4/ultrachat_200k and ultrafeedback_binarized, under the recipe's own split names), `max_steps`,
`output_dir`, and `push_to_hub` (nothing here reaches the Hub). Keys this machine cannot honour (`bf16`,
`flash_attention_2`) must resolve with a one-line note."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from launch import accelerate_launch
from zephyr.train.setup import cpu_has_fast_bf16

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]


def readme_launch_command(recipe: str, stage: str) -> list[str]:
    """The README's one-node `accelerate launch ... -m zephyr STAGE` command, continuation lines joined."""
    text = (ROOT / "recipes" / recipe / "README.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.startswith("accelerate launch") or f"zephyr {stage}" not in line:
            continue
        words = shlex.split(line)
        if "--num_machines" not in words:
            return words
    raise AssertionError(f"recipes/{recipe}/README.md has no one-node accelerate launch command for {stage}")


def with_overrides(words: list[str], overrides: dict[str, str]) -> list[str]:
    """WORDS with each `--key value` / `--key=value` of OVERRIDES replaced where present, appended where not."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        key = word.split("=", 1)[0].removeprefix("--")
        if word.startswith("--") and key in overrides:
            skip = "=" not in word
            continue
        out.append(word)
    return out + [f"--{key}={value}" for key, value in overrides.items()]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def ultrachat(folder: Path) -> Path:
    """train_sft / test_sft in ultrachat_200k's schema: prompt, prompt_id, messages."""
    for split, n in (("train_sft", 80), ("test_sft", 8)):
        rows = []
        for i in range(n):
            prompt = f"Tell me about the number {i}."
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": f"{i} is a number. " * (1 + i % 4)}]  # fmt: skip
            rows.append({"prompt": prompt, "prompt_id": f"{split}-{i}", "messages": messages})
        _write(folder / f"{split}.jsonl", rows)
    return folder


def ultrafeedback(folder: Path) -> Path:
    """train_prefs / test_prefs in ultrafeedback_binarized's schema."""
    # 17 pairs for training: 9 and 8 a process, one batch of 8 more on the first, which a sharded reference pass
    # must not let run alone (every process takes part in each forward)
    for split, n in (("train_prefs", 17), ("test_prefs", 8)):
        rows = []
        for i in range(n):
            prompt = f"What is {i} + 1?"
            chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{i + 1}."}]
            rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Maybe {i}?"}]
            rows.append({"prompt": prompt, "prompt_id": f"{split}-{i}", "chosen": chosen, "rejected": rejected,
                         "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.0})  # fmt: skip
        _write(folder / f"{split}.jsonl", rows)
    return folder


def data_override(recipe_file: Path, local: Path) -> dict[str, str]:
    """The recipe's data keys pointed at LOCAL: the hub id swapped for the folder, splits and columns kept."""
    recipe = yaml.safe_load(recipe_file.read_text())
    if "dataset_mixture" not in recipe:
        return {"dataset_name": str(local)}
    mixture = recipe["dataset_mixture"]
    for entry in mixture["datasets"]:
        entry["id"] = str(local)
    mixture["test_split_size"] = 8
    return {"dataset_mixture": json.dumps(mixture)}


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    from tiny import save_tiny_mistral

    return save_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.mark.parametrize(
    "recipe,stage,max_steps",
    [("zephyr-7b-alpha", "sft", 1), ("zephyr-7b-alpha", "dpo", 2),
     ("zephyr-7b-beta", "sft", 1), ("zephyr-7b-beta", "dpo", 1)],
)  # fmt: skip
def test_recipe_runs_as_its_readme_launches_it(recipe, stage, max_steps, tmp_path, mistral_dir, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    data = ultrachat(tmp_path / "ultrachat") if stage == "sft" else ultrafeedback(tmp_path / "ultrafeedback")
    recipe_file = ROOT / "recipes" / recipe / f"{stage}.yaml"
    out = tmp_path / "out"
    overrides = {"model_name_or_path": str(mistral_dir), **data_override(recipe_file, data),
                 "max_steps": str(max_steps), "output_dir": str(out), "push_to_hub": "false"}  # fmt: skip
    words = with_overrides(readme_launch_command(recipe, stage), overrides)
    assert words[words.index("--config_file") + 1] == "recipes/accelerate/zero3.yaml"
    launcher = words[2 : words.index("-m")]  # after `accelerate launch`
    done = accelerate_launch([*launcher, "--num_processes", "2"], words[words.index("-m") + 2 :])

    assert "DeepSpeed ZeRO-3 on 2 CPU process(es)" in done.stdout
    record = json.loads((out / "zephyr_run.json").read_text())
    if cpu_has_fast_bf16():  # AVX512-BF16 / AMX: the recipe's bf16 runs as asked
        assert record["config"]["bf16"] is True and "no bf16 arithmetic" not in done.stdout
    else:
        assert "note: bf16: true, but this CPU has no bf16 arithmetic" in done.stdout
        assert record["config"]["bf16"] is False
    if yaml.safe_load(recipe_file.read_text()).get("attn_implementation") == "flash_attention_2":
        assert "flash_attention_2 needs a CUDA GPU and the flash-attn package; using sdpa" in done.stdout
        assert record["config"]["attn_implementation"] == "sdpa"
    assert record["distributed_type"] == "DEEPSPEED" and record["num_processes"] == 2
    assert record["parameter_share_per_process"] < 0.6
    if (recipe, stage) == (
        "zephyr-7b-beta",
        "dpo",
    ):  # one step of 8 x 2 x 2 pairs covers the data: precomputed
        assert "reference log-probs: precomputed before training" in done.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == max_steps
    assert (out / "model.safetensors").is_file() and re.search(r"Mistral", (out / "config.json").read_text())
