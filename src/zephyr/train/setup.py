"""What both training stages set up the same way, before any step: the accelerator (precision, trackers, the launch
config honoured), the keys this machine cannot honour or that change nothing, the output folder's claim, and the
policy model (full, LoRA or QLoRA)."""

from __future__ import annotations

import atexit
import dataclasses
from datetime import timedelta
from importlib.util import find_spec
from pathlib import Path

import torch

from zephyr.data.prepare import Prepared, load_recipe_tokenizer, prepare
from zephyr.errors import ConfigError
from zephyr.models import check_vocabulary, load_model
from zephyr.train import run_folder
from zephyr.train.distributed import accelerator_on_cpu, honour_launch_config
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
    """The run's `Accelerator`, after refusing what cannot run: precision from `bf16` / `fp16` and the hardware,
    trackers from `report_to`, the launch config's sharding honoured even on CPU processes
    (`zephyr.train.distributed`), the seed set. Prints one note for each key this run resolves or ignores."""
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


def start_stage(cfg, *, data_stage: str) -> tuple[object, object, Prepared]:
    """What every training stage does first: (accelerator, tokenizer, data). The accelerator is made, the output
    folder claimed, and the recipe's data tokenized by DATA_STAGE's pipeline ("sft", "dpo" for pairs, "kto") -- on
    the main process first, the others reading its cache -- and summarised under the stage's own name."""
    accelerator = make_accelerator(cfg)
    tokenizer = load_recipe_tokenizer(cfg)
    claim_output_dir(accelerator, cfg)
    with accelerator.main_process_first():
        data = dataclasses.replace(prepare(cfg, stage=data_stage, tokenizer=tokenizer), stage=cfg.stage)
    if accelerator.is_main_process:
        print(data.summary())
    return accelerator, tokenizer, data


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
    """The model to train: the recipe's base model, quantised for QLoRA when `load_in_4bit` / `load_in_8bit`
    (LoRA adapters are added by `wrap_lora`)."""
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


def hub_repo_id(cfg) -> str:
    """Where `push_to_hub` sends the model: `hub_model_id` (a bare name goes under the token's user), else the
    output folder's name, as transformers' Trainer does."""
    return cfg.hub_model_id or Path(cfg.output_dir).name
