"""What both training stages set up the same way: the accelerator and its precision, the policy model (full or
LoRA), and the final model folder."""

from __future__ import annotations

import atexit
import json
import os
import shutil
from pathlib import Path

import torch

from zephyr.errors import ConfigError
from zephyr.run_record import RunRecord
from zephyr.train import run_folder
from zephyr.train.distributed import accelerator_on_cpu, honour_launch_config, parameter_share
from zephyr.train.optimizers import optimizer_name


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where a bf16 matrix product beats fp32. Elsewhere (AVX2 only) bf16 is emulated
    and far slower: on this project's AMD EPYC (AVX2) a 2048^2 bf16 matmul took 60 s against 0.27 s in fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(cfg) -> bool:
    """`bf16: null` (the default) means bf16 wherever the hardware runs it fast; true / false force it."""
    if cfg.bf16 is not None:
        return bool(cfg.bf16)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def report_trackers(report_to: list[str] | None) -> list[str]:
    """The `report_to` trackers this environment can run. The local metrics.jsonl is always written; a tracker that
    accelerate supports but that is not installed is left out with a message rather than failing the run."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    wanted = [t for t in (report_to or []) if t != "none"]
    if "all" in wanted:
        return [str(t) for t in get_available_trackers()]
    supported = {str(t) for t in LoggerType}
    unsupported = [t for t in wanted if t not in supported]
    if unsupported:
        raise ConfigError(
            f"report_to: {', '.join(unsupported)} is not a tracker accelerate can drive; use one of "
            f"{', '.join(sorted(supported - {'all'}))}, or none"
        )
    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in wanted if t not in available]
    if missing:
        print(
            f"report_to: {', '.join(missing)} not installed; logging to metrics.jsonl only for those "
            f"(pip install {' '.join(missing)})"
        )
    return [t for t in wanted if t in available]


def make_accelerator(cfg):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

    optimizer_name(cfg)  # refused before anything loads
    machine_notes = resolve_for_machine(cfg)
    mixed = "bf16" if use_bf16(cfg) else ("fp16" if cfg.fp16 else "no")
    trackers = report_trackers(cfg.report_to)
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=accelerator_on_cpu(),
        log_with=trackers or None,
        project_dir=cfg.output_dir,
        dataloader_config=DataLoaderConfiguration(split_batches=False, even_batches=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
    )
    launch = honour_launch_config(accelerator)
    if launch:
        accelerator.print(launch)
    _fill_deepspeed_config(accelerator, cfg)
    for line in machine_notes + unused_key_notes(cfg):
        accelerator.print(line)
    if trackers:
        accelerator.init_trackers(cfg.run_name or Path(cfg.output_dir).name)
    set_seed(cfg.seed)
    if cfg.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    return accelerator


# Keys the handbook's and TRL's recipes carry that change nothing in a Zephyr run, with the reason. Zephyr accepts
# them so those recipes load, and names any that is set away from its default when a run starts.
NO_EFFECT = {
    "do_train": "the stage command trains",
    "do_eval": "eval_strategy decides when to evaluate",
    "log_level": "Zephyr prints its own progress and notes",
    "logging_strategy": "logging_steps decides when to log",
    "logging_first_step": "logging_steps decides when to log",
    "remove_unused_columns": "tokenization keeps only the columns training reads",
    "torch_compile": "not used: packed rows change length every step, and no measurement showed it paying "
    "(docs/performance.md)",
    "use_liger_kernel": "Zephyr's chunked completion head already fuses the LM head and log-softmax",
    "save_only_model": "checkpoints always hold the optimizer and data order, for an exact resume",
    "completion_only_loss": "assistant_only_loss decides which tokens carry the SFT loss",
    "dataset_text_field": "rows are read by their schema (see zephyr data inspect)",
    "dataset_kwargs": "rows are read by their schema (see zephyr data inspect)",
    "eos_token": "the chat template's end-of-turn token ends each reply",
    "truncation_side": "truncation_mode decides (keep_start or keep_end)",
    "generate_during_eval": "zephyr eval demo / eval mt-bench generate from the saved model",
    "force_use_ref_model": "a reference model is loaded whenever the run needs one",
    "model_adapter_name": "LoRA runs use the adapter Zephyr creates",
    "ref_adapter_name": "the LoRA reference is the base model with the adapter disabled",
}


def unused_key_notes(cfg) -> list[str]:
    """One note naming each NO_EFFECT key set away from its default, and hub_strategy's reach."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    notes = [
        f"{key} ({why})"
        for key, why in NO_EFFECT.items()
        if hasattr(cfg, key) and key in defaults and getattr(cfg, key) != defaults[key]
    ]
    lines = [f"note: set but without effect in Zephyr: {'; '.join(notes)}"] if notes else []
    if cfg.push_to_hub and cfg.hub_strategy != "end":
        lines.append(
            f"note: hub_strategy {cfg.hub_strategy}: Zephyr pushes the finished model once, at the end "
            f"(to {hub_repo_id(cfg)}); checkpoints stay local"
        )
    return lines


def claim_output_dir(accelerator, cfg) -> None:
    """Take OUTPUT_DIR for this run (`zephyr.train.run_folder`): its lock, and for a new run the refusal or, with
    `overwrite_output_dir`, the removal of another run's outputs. The main process claims; the others wait."""
    if accelerator.is_main_process:
        resume = cfg.resume_from_checkpoint not in (None, False, "false", "")
        lock, notes = run_folder.claim(
            Path(cfg.output_dir), resume=resume, overwrite=bool(cfg.overwrite_output_dir)
        )
        _held_locks.append(lock)
        for line in notes:
            print(line)
    accelerator.wait_for_everyone()


_held_locks: list[run_folder.RunLock] = []


@atexit.register
def release_output_dirs() -> None:
    """Release the run locks this process holds (at the end of a stage, and at exit after an error)."""
    while _held_locks:
        _held_locks.pop().release()


def resolve_for_machine(cfg) -> list[str]:
    """Turn recipe keys this machine cannot honour into what it can, returning one note for each: a 7B recipe's
    `bf16` / `dtype: bfloat16` on hardware without bf16 arithmetic (emulated bf16 is ~5x slower than fp32 on an AVX2
    CPU), and `flash_attention_2` without the flash-attn package or a CUDA GPU."""
    notes = []
    if not torch.cuda.is_available() and not cpu_has_fast_bf16():
        if cfg.bf16:
            cfg.bf16 = False
            notes.append(
                "note: bf16: true, but this CPU has no bf16 arithmetic (AVX512-BF16 or AMX); training in fp32"
            )
        if str(cfg.dtype).lower() in ("bfloat16", "bf16"):
            cfg.dtype = "float32"
            notes.append(
                "note: dtype: bfloat16, but this CPU has no bf16 arithmetic; loading the weights in float32"
            )
    if cfg.attn_implementation == "flash_attention_2" and not _flash_attention_runs():
        cfg.attn_implementation = "sdpa"
        notes.append(
            "note: attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; using sdpa"
        )
    return notes


def _flash_attention_runs() -> bool:
    from importlib.util import find_spec

    return torch.cuda.is_available() and find_spec("flash_attn") is not None


def _fill_deepspeed_config(accelerator, cfg) -> None:
    """DeepSpeed's batch settings, which it cannot infer: prepare() gets no dataloader (the loop builds one per
    epoch)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds["train_batch_size"] = (
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    )
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0


def load_policy(cfg, tokenizer):
    """The model to train: the recipe's base model, with LoRA adapters when `use_peft`."""
    from zephyr.models import check_vocabulary, load_model

    quantization = None
    if cfg.load_in_4bit or cfg.load_in_8bit:  # QLoRA
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            bitsandbytes = None
        if not torch.cuda.is_available() or bitsandbytes is None:
            raise ConfigError(
                "load_in_4bit / load_in_8bit (QLoRA) need a CUDA GPU and bitsandbytes; set them false"
            )
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=cfg.load_in_4bit,
            load_in_8bit=cfg.load_in_8bit,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16(cfg) else torch.float16,
        )
    model = load_model(
        cfg.model_name_or_path,
        dtype=cfg.dtype,
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        device_map={"": torch.cuda.current_device()} if quantization is not None else None,
        quantization_config=quantization,
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    check_vocabulary(model, tokenizer)
    if getattr(cfg, "disable_dropout", False):
        disable_dropout(model)
    model.config.use_cache = False
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def wrap_lora(cfg, model):
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules or "all-linear",
        modules_to_save=cfg.lora_modules_to_save,
        task_type=cfg.lora_task_type,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    model = get_peft_model(model, lora)
    if getattr(cfg, "disable_dropout", False):
        disable_dropout(model)  # LoRA's own dropout layers too, as TRL does (it disables after wrapping)
    return model


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
    from transformers import GenerationConfig

    from zephyr.config import config_to_dict
    from zephyr.train.checkpoint import fault_point
    from zephyr.train.results import write_results

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
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("zephyr", "transformers", "torch", "accelerate", "datasets", "tokenizers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _final_save_failed(err: Exception, output_dir: Path) -> None:
    """Turn a failed write of the final model folder into one message saying what is left to resume from."""
    from zephyr.errors import ZephyrError
    from zephyr.train.checkpoint import _is_write_error, _reason, latest_checkpoint

    if not _is_write_error(err):
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
        f"could not write the final model to {output_dir}: {_reason(err, output_dir)}; {kept}"
    ) from err


def _write_card(output_dir: Path) -> None:
    """The model card; the model is already saved, so a card that cannot be written costs a message, not the run."""
    from zephyr.card import write_card

    try:
        path = write_card(output_dir)
    except Exception as err:  # noqa: BLE001 - reported, and `zephyr card` can write it later
        print(
            f"the model card was not written ({type(err).__name__}: {err}); write it with: zephyr card {output_dir}"
        )
    else:
        print(f"model card: {path}")


def finish(accelerator, result, tokenizer, cfg, *, extra: dict | None = None):
    """End a stage: write the model folder unless a signal stopped the run (its checkpoint is what to resume from),
    then close the trackers."""
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
        if accelerator.is_main_process:
            _write_card(output_dir)
            if cfg.push_to_hub:
                push_to_hub(cfg, Path(output_dir))
    accelerator.end_training()
    release_output_dirs()
    return result


def hub_repo_id(cfg) -> str:
    """Where `push_to_hub` sends the model: `hub_model_id` (a bare name goes under the token's user), else the
    output folder's name, as transformers' Trainer does."""
    return cfg.hub_model_id or Path(cfg.output_dir).name


def push_to_hub(cfg, folder: Path) -> str:
    """Upload the finished model FOLDER's deliverables (`run_folder.DELIVERABLES`: weights, config, tokenizer,
    generation config, card, results, plot, metrics and run record; never checkpoints or rejected rows) to the Hub,
    into a private repository unless `hub_private_repo: false`.

    Zephyr pushes once, at the end, whatever `hub_strategy` says; the run said so when it started. A push that
    fails (no network, no token, no rights) leaves the saved folder as it is and is an error that says how to push
    it later."""
    from huggingface_hub import HfApi

    from zephyr.errors import ZephyrError

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
