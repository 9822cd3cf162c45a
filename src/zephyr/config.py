"""Recipe configs: one flat, typed dataclass per stage, with the alignment-handbook / TRL / Transformers key names.

`zephyr.recipe.load_config` builds them from a YAML recipe and `--key=value` overrides and checks every value;
this module only declares the keys, their types and defaults, and the fixed vocabularies some of them take.
Keys whose values name a registry entry (`loss_type`, `f_divergence_type`, `optim`) are checked against the registry
(`zephyr.train.objectives`, `zephyr.train.optimizers`) by the loader, not listed here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zephyr.fetch import EMBEDDED_MODEL

# ---------------------------------------------------------------------------------------------- vocabularies

# transformers.SchedulerType (5.x); tests/test_config.py checks these against the installed transformers.
LR_SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)  # fmt: skip
DTYPES = ("auto", "bfloat16", "float16", "float32")
STRATEGIES = ("no", "steps", "epoch")
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
LOG_LEVELS = ("detail", "debug", "info", "warning", "error", "critical", "passive")
REPORT_TO = (
    "all", "none", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "clearml", "dvclive", "neptune",
    "azure_ml", "codecarbon", "dagshub", "flyte", "swanlab", "kubeflow",
)  # fmt: skip
# The model card's words that a run cannot know (zephyr.card writes the rest from the run's record), and their types.
CARD_TYPES = {
    "model_id": str, "base_model": str, "license": str, "language": list[str], "datasets": list[str],
    "tags": list[str], "description": str, "intended_uses": str, "limitations": str,
}  # fmt: skip
CARD_KEYS = tuple(CARD_TYPES)


def _choice(default: Any, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _list(*default: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default_factory=lambda: list(default), metadata={"choices": choices} if choices else {})


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class RecipeConfig:
    """Keys both stages share: model, data, and training. Defaults are TRL 1.16 / Transformers 5.x's."""

    stage: ClassVar[str] = ""

    # Model (TRL ModelConfig; the handbook's ModelArguments)
    model_name_or_path: str = EMBEDDED_MODEL
    model_revision: str = "main"
    tokenizer_name_or_path: str | None = None
    dtype: str | None = _choice("float32", DTYPES)  # legacy name: torch_dtype
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # legacy: use_flash_attention_2: true
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str | None = None  # a list of module names, or "all-linear"
    lora_modules_to_save: list[str] | None = None
    lora_task_type: str = _choice("CAUSAL_LM", ("CAUSAL_LM",))
    use_rslora: bool = False
    use_dora: bool = False
    merge_adapter: bool = (
        False  # LoRA: save the merged model in output_dir (the adapter goes to output_dir/adapter)
    )
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = _choice("nf4", ("fp4", "nf4"))
    use_bnb_nested_quant: bool = False

    # Data: exactly one of dataset_name, dataset_mixer, dataset_mixture (see zephyr.data.mixing)
    chat_template: str = "auto"  # auto | zephyr | a Jinja string | a path to a .jinja file
    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    dataset_mixer: dict[str, int | float] | None = None  # {source: fraction in (0, 1], or a row count > 1}
    dataset_splits: list[str] | None = None  # for dataset_mixer; None reads ["train", "test"]
    dataset_configs: list[str] | None = None  # for dataset_mixer, one per source
    dataset_mixture: dict[str, Any] | None = (
        None  # {datasets: [{id, config, split, columns, weight}], seed, ...}
    )
    test_split_size: int | float | None = None  # a fraction, or a row count
    dataset_num_proc: int | None = None  # legacy name: preprocessing_num_workers
    schema: str = "auto"
    skip_invalid: bool = False
    truncation_side: str | None = _choice(None, ("left", "right"))
    auto_insert_empty_system_msg: bool = True
    max_length: int | None = 1024
    truncation_mode: str = _choice("keep_start", ("keep_end", "keep_start"))
    padding_free: bool = False

    # Training (transformers TrainingArguments)
    output_dir: str = "outputs"
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | bool | None = (
        None  # a checkpoint folder, or true for the latest in output_dir
    )
    seed: int = 42
    data_seed: int | None = None
    do_train: bool = False
    do_eval: bool = False
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = _choice("linear", LR_SCHEDULER_TYPES)
    lr_scheduler_kwargs: dict[str, Any] | None = None
    # Transformers 5 folded warmup_ratio into a fractional warmup_steps; both forms are kept (set one).
    warmup_ratio: float = 0.0
    warmup_steps: int | float = 0
    optim: str = "adamw_torch_fused"  # a name in zephyr.train.optimizers.OPTIMIZERS
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None: the training loop decides from the hardware
    fp16: bool = False
    tf32: bool | None = None
    gradient_checkpointing: bool = True
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    torch_compile: bool = False
    use_liger_kernel: bool = False
    eval_strategy: str = _choice("no", STRATEGIES)  # legacy name: evaluation_strategy
    eval_steps: int | float | None = None  # None: logging_steps; < 1: a fraction of the run
    logging_strategy: str = _choice("steps", STRATEGIES)
    logging_steps: int | float = 10
    logging_first_step: bool = False
    log_level: str = _choice("passive", LOG_LEVELS)
    report_to: list[str] = _list(choices=REPORT_TO)  # [] (or "none"): only the local JSONL log
    run_name: str | None = None
    save_strategy: str = _choice("steps", (*STRATEGIES, "best"))
    save_steps: int | float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_strategy: str = _choice("every_save", HUB_STRATEGIES)
    hub_private_repo: bool | None = None
    # {license, language, description, ...}: the model card's words the run cannot know (see zephyr.card)
    card: dict[str, Any] = field(default_factory=dict)
    remove_unused_columns: bool = True
    dataloader_num_workers: int = 0
    dataloader_drop_last: bool = False
    # random: a seeded permutation per epoch (seed + epoch); sequential: file order (what parity tests use)
    train_sampling_strategy: str = _choice("random", ("random", "sequential"))
    ddp_timeout: int = 1800

    def global_batch_size(self, num_processes: int) -> int:
        """Sequences (SFT) or pairs (DPO) per optimizer step across NUM_PROCESSES processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warmup length for a run of TOTAL_STEPS optimizer steps, as Transformers computes it."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * (self.warmup_ratio or self.warmup_steps))


@dataclass
class SFTConfig(RecipeConfig):
    """Supervised fine-tuning (`zephyr sft`): RecipeConfig plus trl.SFTConfig's keys."""

    stage: ClassVar[str] = "sft"

    output_dir: str = "outputs/sft"
    learning_rate: float = 2e-5
    packing: bool = False
    # Labels on assistant tokens only, as Zephyr's chat models are meant to learn replies, not prompts.
    # TRL's default is False (loss on every token, which is also what the handbook's SFT did).
    assistant_only_loss: bool = True
    completion_only_loss: bool | None = None
    dataset_text_field: str = "text"
    dataset_kwargs: dict[str, Any] | None = None
    eos_token: str | None = None


@dataclass
class DPOConfig(RecipeConfig):
    """Direct preference optimisation (`zephyr dpo`): RecipeConfig plus trl.DPOConfig's keys."""

    stage: ClassVar[str] = "dpo"

    output_dir: str = "outputs/dpo"
    learning_rate: float = 1e-6
    beta: float = 0.1
    # Names in zephyr.train.objectives.LOSSES: one, or several mixed by loss_weights
    loss_type: list[str] = _list("sigmoid")
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    max_prompt_length: int | None = None  # prompt tokens kept before the completion; None: only max_length
    max_completion_length: int | None = None
    reference_free: bool = False
    ref_model_name_or_path: str | None = None  # None: a frozen copy of the starting model
    # None (unset): precompute when the run trains on every pair at least once (zephyr.train.dpo.precompute_choice)
    precompute_ref_log_probs: bool | None = None
    precompute_ref_batch_size: int | None = None
    disable_dropout: bool = True
    rpo_alpha: float | None = None
    use_weighting: bool = False
    ld_alpha: float | None = None
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"  # a name in zephyr.train.objectives.F_DIVERGENCES
    f_alpha_divergence_coef: float = 0.5
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    padding_value: int | None = None
    # Zephyr's fast layout: each pair's prompt runs once and a micro-batch is one packed row with no padding
    # (zephyr.train.shared_prefix); same numbers as TRL's two padded rows per pair. `padding_free: true` asks for it too.
    # None (unset): on wherever the model's attention takes it (sdpa, eager); false: TRL's layout.
    prefix_sharing: bool | None = None
    generate_during_eval: bool = False
    force_use_ref_model: bool = False
    model_adapter_name: str | None = None
    ref_adapter_name: str | None = None


@dataclass
class CPOConfig(RecipeConfig):
    """Contrastive preference optimisation (`zephyr cpo`): RecipeConfig plus trl.experimental.cpo.CPOConfig's keys.

    No reference model: the loss compares the policy's own chosen and rejected log-probs, plus `cpo_alpha` times the
    NLL of the chosen completions. TRL 1.16's `alpha` (AlphaPO) is not implemented, so it is not a key here."""

    stage: ClassVar[str] = "cpo"

    output_dir: str = "outputs/cpo"
    learning_rate: float = 1e-6
    beta: float = 0.1
    label_smoothing: float = 0.0
    # A name in zephyr.train.objectives.CPO_LOSSES (TRL's CPO loss types; one, not a list as for DPO)
    loss_type: str = field(default="sigmoid", metadata={"registry": "cpo_loss_type"})
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    # Cut as DPO's (zephyr.data.tokenize). TRL 1.16's CPOConfig has no max_prompt_length (older TRL had it) and reads
    # max_completion_length only for encoder-decoder models.
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    disable_dropout: bool = True
    padding_value: int | None = None
    # As DPO's; the packed layout has no padding positions for TRL's logits/*, which it leaves out (zephyr.train.cpo).
    prefix_sharing: bool | None = None


@dataclass
class SimPOConfig(CPOConfig):
    """SimPO (`zephyr simpo`): TRL's CPO with `loss_type: simpo` and no NLL term (`cpo_alpha: 0`), as TRL's SimPO
    documentation sets it; every CPO key applies."""

    stage: ClassVar[str] = "simpo"

    output_dir: str = "outputs/simpo"
    loss_type: str = field(default="simpo", metadata={"registry": "cpo_loss_type"})
    cpo_alpha: float = 0.0


@dataclass
class ORPOConfig(RecipeConfig):
    """Odds ratio preference optimisation (`zephyr orpo`): RecipeConfig plus trl.experimental.orpo.ORPOConfig's keys.

    One stage from a base model: the NLL of the chosen sequences plus `beta` (the paper's λ) times the odds-ratio
    loss; no reference model and no separate SFT step."""

    stage: ClassVar[str] = "orpo"
    # ORPO's NLL covers the prompt, which the packed layout does not score: always TRL's two padded rows per pair.
    prefix_sharing: ClassVar[bool] = False

    output_dir: str = "outputs/orpo"
    learning_rate: float = 1e-6
    beta: float = 0.1
    # Cut as DPO's (zephyr.data.tokenize); TRL 1.16's ORPOConfig reads max_completion_length only for
    # encoder-decoder models and has no max_prompt_length.
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    disable_dropout: bool = True
    padding_value: int | None = None


@dataclass
class KTOConfig(RecipeConfig):
    """Kahneman-Tversky optimisation (`zephyr kto`): RecipeConfig plus trl.KTOConfig's keys (TRL 1.16's defaults).

    Unpaired data (prompt / completion / label) or preference pairs, unpaired as TRL does. The reference model is
    needed: a frozen copy of the starting model, or with LoRA the base model (adapters disabled)."""

    stage: ClassVar[str] = "kto"
    # TRL's KTO collator cuts every sequence to max_length from the end (no truncation_mode key in its KTOConfig).
    truncation_mode: ClassVar[str] = "keep_start"

    output_dir: str = "outputs/kto"
    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = field(default="kto", metadata={"registry": "kto_loss_type"})
    # None (unset): chosen from the train split's class counts (zephyr.train.objectives.kto_class_weights); TRL's
    # default is 1.0 and 1.0 whatever the counts.
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    ref_model_name_or_path: str | None = None  # None: a frozen copy of the starting model
    # Reference log-probs are computed in each step; true (TRL's precomputed pass) is refused until it is implemented.
    precompute_ref_log_probs: bool = False
    disable_dropout: bool = True


STAGES: dict[str, type[RecipeConfig]] = {
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "cpo": CPOConfig,
    "simpo": SimPOConfig,
    "orpo": ORPOConfig,
    "kto": KTOConfig,
}


def config_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """CFG as plain YAML/JSON values, to save next to a run; `zephyr.recipe.load_config` reads it back to an equal
    config."""
    return dataclasses.asdict(cfg)
