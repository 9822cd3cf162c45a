"""The end of a training stage: the final model folder, written atomically, and its run record.

`save_final` gathers sharded weights (FSDP, ZeRO-3) on every process and writes, on the main process, a folder that
`transformers.pipeline("text-generation", model=OUTPUT_DIR)` loads. `finish` ends a stage with it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transformers import GenerationConfig

from zephyr import __version__
from zephyr.config import config_to_dict
from zephyr.errors import ZephyrError
from zephyr.run_record import RunRecord
from zephyr.train import run_folder
from zephyr.train.checkpoint import fault_point, is_write_error, latest_checkpoint, write_error_reason
from zephyr.train.distributed import parameter_share
from zephyr.train.results import write_results
from zephyr.train.setup import release_output_dirs

# The zephyr-7b-alpha card's sampling settings, so its `pipeline(...)` snippet behaves the same on our output.
CARD_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.95, "max_new_tokens": 256}


def save_final(
    accelerator, model, tokenizer, cfg, *, base_model: str, log_history: list[dict], extra: dict | None = None
) -> Path:
    """Write the trained model as a Hugging Face folder in OUTPUT_DIR that `transformers.pipeline("text-generation",
    model=OUTPUT_DIR)` loads: safetensors weights (sharded when large), config, a generation config with the card's
    sampling defaults and the tokenizer's eos, the tokenizer with its chat template (in chat_template.jinja and in
    tokenizer_config.json), `zephyr_run.json`, `results.md` and `training.png`.

    LoRA runs save the adapter (OUTPUT_DIR is then a PEFT adapter folder on top of the base model), or with
    `merge_adapter: true` the merged model, with the adapter alone in OUTPUT_DIR/adapter. Files are written to a
    temporary folder and moved in at the end, so a crash never leaves a half-written weights file.
    """
    output_dir = Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(
        model
    )  # gathers sharded (FSDP / ZeRO-3) weights; all ranks take part
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return output_dir
    unwrapped = accelerator.unwrap_model(model)
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    is_lora = hasattr(unwrapped, "merge_and_unload")
    if is_lora and cfg.merge_adapter:
        unwrapped.save_pretrained(staging / "adapter")
        unwrapped = unwrapped.merge_and_unload()
        state_dict = None
    config = unwrapped.config if not is_lora or cfg.merge_adapter else unwrapped.get_base_model().config
    config.use_cache = True
    unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
    if is_lora and not cfg.merge_adapter:
        config.save_pretrained(staging / "base_config")  # for reference; the adapter names its base model
    generation = GenerationConfig.from_model_config(config)
    generation.update(
        **CARD_SAMPLING,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    generation.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    tokenizer_config = staging / "tokenizer_config.json"
    if tokenizer.chat_template and tokenizer_config.is_file():  # older readers look for it here
        data = json.loads(tokenizer_config.read_text())
        data["chat_template"] = tokenizer.chat_template
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    RunRecord(
        stage=cfg.stage,
        config=config_to_dict(cfg),
        log_history=log_history,
        base_model=base_model,
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type.value),
        total_train_batch_size=cfg.global_batch_size(accelerator.num_processes),
        total_eval_batch_size=cfg.per_device_eval_batch_size * accelerator.num_processes,
        parameter_share_per_process=round(parameter_share(model), 4),
        mixed_precision=accelerator.mixed_precision,
        framework_versions=framework_versions(),
        zephyr_version=__version__,
        **(extra or {}),
    ).write(staging)
    write_results(staging, log_history, cfg.stage)
    fault_point("final-save")
    staged = {path.name for path in staging.iterdir()}
    for stale in run_folder.final_save_files(output_dir):  # an earlier save's files this one does not replace
        if stale.name not in staged:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for path in staging.iterdir():
        target = output_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()
    accelerator.wait_for_everyone()
    return output_dir


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on, as the card's "Framework versions" lists them."""
    found = {}
    for name in ("zephyr", "transformers", "torch", "accelerate", "datasets", "tokenizers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _final_save_failed(err: Exception, output_dir: Path) -> None:
    """Turn a failed write of the final model folder into one message saying what is left to resume from."""
    if not is_write_error(err):
        return
    shutil.rmtree(output_dir / ".final.tmp", ignore_errors=True)
    last = latest_checkpoint(output_dir)
    kept = (
        f"the last checkpoint {last} is intact: free space (or fix the folder's permissions) and run again with "
        "--resume_from_checkpoint true"
        if last
        else "no checkpoint was saved (save_strategy), so the run must be repeated once the disk has room"
    )
    raise ZephyrError(
        f"could not write the final model to {output_dir}: {write_error_reason(err, output_dir)}; {kept}"
    ) from err


def finish(
    accelerator,
    result,
    tokenizer,
    cfg,
    *,
    extra: dict | None = None,
    on_saved: Callable[[Path], None] | None = None,
):
    """End a stage: write the model folder unless a signal stopped the run (its checkpoint is what to resume from),
    hand it to ON_SAVED on the main process (the stage's entry point writes the card and pushes there, while the
    run still holds its folder), then close the trackers and release the folder."""
    if not result.stopped_early:
        try:
            output_dir = save_final(
                accelerator,
                result.model,
                tokenizer,
                cfg,
                base_model=cfg.model_name_or_path,
                log_history=result.state.log_history,
                extra={**(extra or {}), "fingerprint": result.state.fingerprint},
            )
        except Exception as err:
            _final_save_failed(err, Path(cfg.output_dir))
            raise
        if accelerator.is_main_process and on_saved is not None:
            on_saved(output_dir)
    accelerator.end_training()
    release_output_dirs()
    return result
