"""The training stages as `zephyr sft`, `dpo`, `cpo`, `simpo`, `orpo` and `kto` run them: train (`zephyr.train.sft`,
`.dpo`, `.cpo`, `.orpo`, `.kto`), then, on the main process and while the run still holds its folder, write the model card and push
the folder to the Hub when the recipe asks. Training itself knows nothing of cards or the Hub; this is the layer above it.

    result = run_stage(load_config("dpo", "recipes/zephyr-7b-beta/dpo.yaml", []))
"""

from __future__ import annotations

from pathlib import Path

from zephyr.card import write_card
from zephyr.errors import ZephyrError
from zephyr.train import run_folder
from zephyr.train.cpo import run_cpo
from zephyr.train.dpo import run_dpo
from zephyr.train.kto import run_kto
from zephyr.train.loop import TrainResult
from zephyr.train.orpo import run_orpo
from zephyr.train.setup import hub_repo_id
from zephyr.train.sft import run_sft

STAGES = {"sft": run_sft, "dpo": run_dpo, "cpo": run_cpo, "simpo": run_cpo, "orpo": run_orpo, "kto": run_kto}


def run_stage(cfg, *, progress: bool = True) -> TrainResult:
    """Train CFG's stage; its saved folder gets the card, and is pushed with `push_to_hub`."""
    return STAGES[cfg.stage](cfg, progress=progress, on_saved=lambda folder: publish(cfg, Path(folder)))


def publish(cfg, folder: Path) -> None:
    _write_card(folder)
    if cfg.push_to_hub:
        push_to_hub(cfg, folder)


def _write_card(output_dir: Path) -> None:
    """The model card; the model is already saved, so a card that cannot be written costs a message, not the run."""
    try:
        path = write_card(output_dir)
    except Exception as err:  # noqa: BLE001 - reported, and `zephyr card` can write it later
        print(
            f"the model card was not written ({type(err).__name__}: {err}); write it with: zephyr card {output_dir}"
        )
    else:
        print(f"model card: {path}")


def push_to_hub(cfg, folder: Path) -> str:
    """Upload the finished model FOLDER's deliverables (`run_folder.DELIVERABLES`: weights, config, tokenizer,
    generation config, card, results, plot, metrics and run record; never checkpoints or rejected rows) to the Hub,
    into a private repository unless `hub_private_repo: false`.

    Zephyr pushes once, at the end, whatever `hub_strategy` says; the run said so when it started. A push that
    fails (no network, no token, no rights) leaves the saved folder as it is and is an error that says how to push
    it later."""
    from huggingface_hub import HfApi

    repo_id = hub_repo_id(cfg)
    try:
        api = HfApi()
        # Private unless the recipe says otherwise: a run's first push should not publish it by accident.
        repo = api.create_repo(repo_id, private=cfg.hub_private_repo is not False, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo.repo_id,
            commit_message="zephyr: end of training",
            allow_patterns=list(run_folder.DELIVERABLES),
            ignore_patterns=["checkpoint-*", ".*", "rejects.jsonl"],  # a pattern's * also matches "/"
        )
    except Exception as err:  # noqa: BLE001 - any failure of the hub client: the model is saved either way
        raise ZephyrError(
            f"the model is saved in {folder}, but pushing it to the Hub as {repo_id} failed "
            f"({type(err).__name__}: {err}); push it later with: hf upload {repo_id} {folder}"
        ) from err
    print(f"pushed {folder} to the Hub as {repo.repo_id}")
    return repo.repo_id
