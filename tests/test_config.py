"""Recipe configs: handbook recipes of every era load unchanged, overrides win, every mistake is named."""

from __future__ import annotations

import importlib.util
import json
import re
import types
from pathlib import Path

import pytest
import yaml

from zephyr.config import LR_SCHEDULER_TYPES, DPOConfig, SFTConfig, config_to_dict
from zephyr.errors import ConfigError
from zephyr.recipe import config_keys, describe_keys, load_config
from zephyr.train.objectives import LOSSES, check_loss_config
from zephyr.train.optimizers import OPTIMIZERS, optimizer_name

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "handbook"
RECIPES = ROOT / "recipes"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(stage: str, config_file=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(stage, config_file, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- handbook fixtures

_UFB = "HuggingFaceH4/ultrafeedback_binarized"
_UC = "HuggingFaceH4/ultrachat_200k"
_SEVEN_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# What each published recipe means in today's key names: the legacy spellings mapped, the numbers kept.
HANDBOOK = {
    "era1-zephyr-7b-beta-sft-config_full.yaml": dict(
        attn_implementation="flash_attention_2", dtype="bfloat16", eval_strategy="epoch", max_length=2048,
        dataset_mixer={_UC: 1.0}, dataset_splits=["train_sft", "test_sft"], dataset_num_proc=12, tf32=True,
        per_device_train_batch_size=32, gradient_accumulation_steps=2, learning_rate=2e-5, save_strategy="no",
        save_total_limit=None, report_to=["tensorboard"], lr_scheduler_type="cosine", num_train_epochs=1.0,
    ),
    "era1-zephyr-7b-beta-dpo-config_full.yaml": dict(
        beta=0.1, num_train_epochs=3.0, optim="rmsprop", lr_scheduler_type="linear", eval_strategy="steps",
        eval_steps=100, learning_rate=5e-7, max_length=1024, max_prompt_length=512, per_device_train_batch_size=8,
        per_device_eval_batch_size=4, dataset_mixer={_UFB: 1.0}, dataset_splits=["train_prefs", "test_prefs"],
        dataset_num_proc=12, warmup_ratio=0.1,
    ),
    "era2-zephyr-7b-beta-dpo-config_full.yaml": dict(
        dtype=None, beta=0.01, num_train_epochs=1.0, optim="adamw_torch", lr_scheduler_type="cosine",
        eval_strategy="steps", gradient_accumulation_steps=2, gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps", save_steps=100, save_total_limit=1,
    ),
    "era2-zephyr-7b-beta-sft-config_lora.yaml": dict(
        dtype="auto", attn_implementation="flash_attention_2", eval_strategy="epoch", max_length=2048, use_peft=True,
        lora_r=64, lora_alpha=16, lora_dropout=0.1, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        gradient_accumulation_steps=128,
    ),
    "era2-zephyr-7b-beta-dpo-config_lora.yaml": dict(
        dtype="auto", eval_strategy="epoch", eval_steps=100, optim="rmsprop", gradient_accumulation_steps=32,
        per_device_train_batch_size=2, lora_r=64, num_train_epochs=3.0,
    ),
    "era2-zephyr-7b-beta-sft-config_qlora.yaml": dict(
        attn_implementation="flash_attention_2", eval_strategy="epoch", max_length=2048, load_in_4bit=True,
        use_peft=True, lora_r=16, lora_alpha=16, lora_target_modules=_SEVEN_PROJ, learning_rate=2e-4,
    ),
    "era2-zephyr-7b-beta-dpo-config_qlora.yaml": dict(
        attn_implementation="flash_attention_2", eval_strategy="steps", load_in_4bit=True, lora_r=128,
        lora_alpha=128, optim="paged_adamw_32bit", learning_rate=5e-6, output_dir="data/zephyr-7b-dpo-qlora",
    ),
    "era3-zephyr-7b-beta-sft-config_qlora.yaml": dict(
        attn_implementation="flash_attention_2", eval_strategy="epoch", max_length=2048, load_in_4bit=True,
    ),
    "era3-zephyr-7b-beta-dpo-config_qlora.yaml": dict(
        attn_implementation="flash_attention_2", eval_strategy="steps", optim="paged_adamw_32bit", beta=0.01,
    ),
    "era3-zephyr-7b-beta-dpo-config_full.yaml": dict(
        dtype=None, eval_strategy="steps", dataset_mixer={_UFB: 1.0}, dataset_num_proc=12, beta=0.01,
    ),
    "era4-zephyr-7b-beta-sft-config_full.yaml": dict(
        dtype="bfloat16", max_length=2048, dataset_num_proc=12, per_device_train_batch_size=16, report_to=["wandb"],
        dataset_mixture={
            "datasets": [
                {"id": _UC, "config": "default", "split": "train_sft", "columns": ["messages"], "weight": 1.0},
                {"id": _UC, "config": "default", "split": "test_sft", "columns": ["messages"], "weight": 1.0},
            ],
            "test_split_size": 1000,
            "seed": 0,
        },
    ),
    "era4-zephyr-7b-beta-dpo-config_full.yaml": dict(
        dtype=None, beta=0.01, max_prompt_length=512,
        dataset_mixture={
            "datasets": [
                {"id": _UFB, "config": "default", "split": s, "columns": ["chosen", "rejected"], "weight": 1.0}
                for s in ("train_prefs", "test_prefs")
            ],
            "test_split_size": 2000,
            "seed": 0,
        },
    ),
    "era4-smollm2-sft-config.yaml": dict(
        dataset_name="HuggingFaceTB/smoltalk", dataset_config="all", dataset_train_split="train",
        dataset_test_split="test", dataset_num_proc=24, max_length=8192, learning_rate=3e-4,
        report_to=["tensorboard", "wandb"],
    ),
    "era4-smollm2-dpo-config.yaml": dict(hub_private_repo=True, beta=0.5, num_train_epochs=3.0, learning_rate=1e-6),
}  # fmt: skip


def test_every_fixture_has_expectations():
    assert sorted(p.name for p in FIXTURES.glob("*.yaml")) == sorted(HANDBOOK)


@pytest.mark.parametrize("name", sorted(HANDBOOK))
def test_handbook_recipe_loads_unchanged_with_todays_names(name):
    stage = "dpo" if "-dpo-" in name else "sft"
    cfg = load_config(stage, FIXTURES / name)
    for key, expected in HANDBOOK[name].items():
        assert getattr(cfg, key) == expected, key
    assert type(cfg) is (DPOConfig if stage == "dpo" else SFTConfig)


def test_handbook_chat_template_string_is_kept_verbatim():
    cfg = load_config("sft", FIXTURES / "era4-zephyr-7b-beta-sft-config_full.yaml")
    assert cfg.chat_template.startswith("{% for message in messages %}\n{% if message['role'] == 'user' %}\n")
    assert "{{ '<|assistant|>\n'  + message['content'] + eos_token }}" in cfg.chat_template


# ---------------------------------------------------------------------------------------------- overrides


def test_command_line_wins_over_file_and_file_over_defaults(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-5\nseed: 7\nmax_steps: 3\n")
    cfg = load_config("sft", path, ["--learning_rate", "3e-5", "--max_steps=5"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.seed) == (3e-5, 5, 7)
    assert cfg.num_train_epochs == 3.0  # untouched default


def test_equals_and_space_forms_agree():
    a = load_config("dpo", None, ["--beta=0.25", "--loss_type=ipo", "--max_length=64"])
    b = load_config("dpo", None, ["--beta", "0.25", "--loss_type", "ipo", "--max_length", "64"])
    assert a == b and a.beta == 0.25 and a.loss_type == ["ipo"] and a.max_length == 64


def test_legacy_key_in_file_is_overridden_by_new_key_on_command_line(tmp_path):
    path = write(tmp_path, "evaluation_strategy: epoch\nmax_seq_length: 2048\n")
    cfg = load_config("sft", path, ["--eval_strategy", "steps", "--max_length", "256"])
    assert (cfg.eval_strategy, cfg.max_length) == ("steps", 256)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("no", False),
        ("False", False),
    ],
)
def test_bool_values(token, expected):
    assert load_config("sft", None, [f"--packing={token}"]).packing is expected


def test_bare_flag_is_true_and_no_prefix_is_false():
    cfg = load_config("dpo", None, ["--reference_free", "--no_disable_dropout", "--beta", "0.2"])
    assert cfg.reference_free is True and cfg.disable_dropout is False and cfg.beta == 0.2


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("q_proj,v_proj", ["q_proj", "v_proj"]),
        ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
        ("q_proj", ["q_proj"]),
        ("all-linear", "all-linear"),  # peft's keyword stays a string
    ],
)
def test_list_values(token, expected):
    assert load_config("sft", None, ["--lora_target_modules", token]).lora_target_modules == expected


def test_dict_and_number_list_values():
    cfg = load_config(
        "dpo",
        None,
        [
            "--loss_type",
            "sigmoid,sft",
            "--loss_weights",
            "[0.8, 0.2]",
            "--lr_scheduler_kwargs",
            "{min_lr: 1.0e-7}",
        ],
    )
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [0.8, 0.2]
    assert cfg.lr_scheduler_kwargs == {"min_lr": 1e-7}


@pytest.mark.parametrize("token", ["null", "none", "None", "~"])
def test_none_values(token):
    cfg = load_config("sft", None, [f"--max_length={token}", f"--dtype={token}", f"--bf16={token}"])
    assert cfg.max_length is None and cfg.dtype is None and cfg.bf16 is None


def test_report_to_none_means_no_trackers():
    assert load_config("sft", None, ["--report_to", "none"]).report_to == []
    assert load_config("sft", None, ["--report_to", "tensorboard,wandb"]).report_to == [
        "tensorboard",
        "wandb",
    ]


def test_yaml_spellings_that_pyyaml_reads_oddly(tmp_path):
    # PyYAML reads `5e-7` (no decimal point) as a string and a bare `no` as false.
    path = write(tmp_path, "learning_rate: 5e-7\nsave_strategy: no\neval_steps: 0.25\nsave_steps: 100\n")
    cfg = load_config("dpo", path)
    assert cfg.learning_rate == 5e-7 and cfg.save_strategy == "no"
    assert cfg.eval_steps == 0.25 and cfg.save_steps == 100 and isinstance(cfg.save_steps, int)


@pytest.mark.parametrize("size", ["0", "1.5", "-3"])
def test_test_split_size_is_a_fraction_or_a_row_count(size):
    assert "a fraction in (0, 1) or a whole row count" in error("sft", None, ["--test_split_size", size])


def test_row_counts_stay_integers(tmp_path):
    # datasets reads test_size=1000 as rows but 1000.0 as a (bad) fraction, so the type must survive.
    path = write(
        tmp_path, "dataset_mixture: {datasets: [{id: a}], test_split_size: 1000}\ntest_split_size: 0.1\n"
    )
    cfg = load_config("sft", path)
    assert type(cfg.dataset_mixture["test_split_size"]) is int and cfg.test_split_size == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learning_rate=1"], "Unexpected command-line argument 'learning_rate=1'"),
        (["--max_steps"], "--max_steps on the command line needs a value"),
        (["--seed", "1", "--seed=2"], "--seed is given twice"),
    ],
)
def test_malformed_command_lines(overrides, message):
    assert message in error("sft", None, overrides)


# ---------------------------------------------------------------------------------------------- key errors


def test_unknown_key_in_file_names_key_file_and_closest_valid_key(tmp_path):
    path = write(tmp_path, "learning_rat: 1.0e-5\n")
    message = error("sft", path)
    assert "'learning_rat'" in message and str(path) in message and "did you mean 'learning_rate'?" in message


def test_unknown_key_on_command_line_says_so():
    message = error("dpo", None, ["--per_device_batch_size", "2"])
    assert "on the command line" in message and "per_device_train_batch_size" in message


def test_unknown_key_with_nothing_close_points_to_help():
    assert "zephyr sft --help" in error("sft", None, ["--zzzz", "1"])


@pytest.mark.parametrize(
    ("stage", "key", "owner"),
    [("sft", "beta", "dpo"), ("sft", "max_prompt_length", "dpo"), ("dpo", "packing", "sft"),
     ("dpo", "max_seq_length", "sft"), ("dpo", "assistant_only_loss", "sft")],
)  # fmt: skip
def test_key_of_the_other_stage_is_named_as_such(stage, key, owner):
    message = error(stage, None, [f"--{key}", "1"])
    assert f"'{key}'" in message and f"`zephyr {owner}`" in message and f"not of `zephyr {stage}`" in message


@pytest.mark.parametrize(
    ("stage", "key", "owners"),
    [("dpo", "simpo_gamma", ["cpo", "simpo"]), ("dpo", "cpo_alpha", ["cpo", "simpo"]),
     ("simpo", "rpo_alpha", ["dpo"]), ("simpo", "packing", ["sft"]), ("sft", "simpo_gamma", ["cpo", "simpo"])],
)  # fmt: skip
@pytest.mark.parametrize("given", ["command line", "file"])
def test_a_key_of_other_commands_names_every_one_of_them(tmp_path, stage, key, owners, given):
    """Derived from the stages' config dataclasses: each stage whose dataclass has the key is named, in STAGES order,
    with where the key came from; no closest-key guess."""
    if given == "file":
        path = write(tmp_path, f"{key}: 1\n")
        message, source = error(stage, path), f"in {path}"
    else:
        message, source = error(stage, None, [f"--{key}", "1"]), "on the command line"
    named = [f"`zephyr {other}`" for other in owners]
    listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    assert message.startswith(f"'{key}' {source} is a key of {listed}, not of `zephyr {stage}`; remove it")
    assert "\n" not in message and "did you mean" not in message


def test_a_key_no_stage_has_keeps_the_closest_key_hint():
    assert "did you mean 'simpo_gamma'?" in error("simpo", None, ["--simpo_gama", "1"])


def test_legacy_and_new_spelling_with_different_values_is_refused(tmp_path):
    path = write(tmp_path, "evaluation_strategy: steps\neval_strategy: epoch\n")
    message = error("sft", path)
    assert "'evaluation_strategy'" in message and "'eval_strategy'" in message and str(path) in message


def test_legacy_and_new_spelling_with_equal_values_is_accepted(tmp_path):
    path = write(tmp_path, "torch_dtype: bfloat16\ndtype: bfloat16\nmax_seq_length: 64\nmax_length: 64\n")
    cfg = load_config("sft", path)
    assert (cfg.dtype, cfg.max_length) == ("bfloat16", 64)


def test_use_flash_attention_2(tmp_path):
    assert load_config("sft", None, ["--use_flash_attention_2=false"]).attn_implementation is None
    clash = write(tmp_path, "use_flash_attention_2: true\nattn_implementation: sdpa\n")
    assert "use_flash_attention_2" in error("sft", clash)
    contradiction = write(
        tmp_path, "use_flash_attention_2: false\nattn_implementation: flash_attention_2\n", "b.yaml"
    )
    assert "use_flash_attention_2" in error("sft", contradiction)


# ---------------------------------------------------------------------------------------------- value errors


@pytest.mark.parametrize(
    ("stage", "overrides", "expected"),
    [
        ("sft", ["--learning_rate", "-1e-5"], ["learning_rate = -1e-05", "a number >= 0"]),
        ("sft", ["--per_device_train_batch_size", "0"], ["per_device_train_batch_size = 0", "a number >= 1"]),
        ("sft", ["--per_device_train_batch_size", "two"], ["per_device_train_batch_size = 'two'", "an integer"]),
        ("sft", ["--gradient_accumulation_steps", "1.5"], ["gradient_accumulation_steps", "an integer"]),
        ("sft", ["--lr_scheduler_type", "cosin"], ["lr_scheduler_type = 'cosin'", "constant_with_warmup",
                                                   "did you mean 'cosine'"]),
        ("sft", ["--optim", "adam"], ["optim = 'adam'", "paged_adamw_32bit", "did you mean 'adamw_torch'"]),
        ("sft", ["--warmup_ratio", "1.0"], ["warmup_ratio = 1.0", "[0, 1)"]),
        ("sft", ["--warmup_ratio", "-0.1"], ["warmup_ratio = -0.1", "[0, 1)"]),
        ("sft", ["--eval_strategy", "sometimes"], ["eval_strategy = 'sometimes'", "no, steps, epoch"]),
        ("sft", ["--dtype", "fp16"], ["dtype = 'fp16'", "auto, bfloat16, float16, float32"]),
        ("sft", ["--report_to", "tensorbord"], ["report_to = 'tensorbord'", "did you mean 'tensorboard'"]),
        ("sft", ["--max_steps", "0"], ["max_steps = 0", "-1 (use num_train_epochs)"]),
        ("dpo", ["--loss_type", "dpo_hinge"], ["loss_type = 'dpo_hinge'", "sigmoid, hinge, ipo"]),
        ("dpo", ["--truncation_mode", "keep_middle"], ["truncation_mode = 'keep_middle'", "keep_end, keep_start"]),
        ("dpo", ["--beta", "0"], ["beta = 0.0", "a number > 0"]),
        ("dpo", ["--beta", "-0.1"], ["beta = -0.1", "a number > 0"]),
        ("dpo", ["--label_smoothing", "0.6"], ["label_smoothing = 0.6", "[0, 0.5]"]),
        ("dpo", ["--label_smoothing", "-0.1"], ["label_smoothing = -0.1", "[0, 0.5]"]),
        ("dpo", ["--ld_alpha", "1.5"], ["ld_alpha = 1.5", "[0, 1]"]),
        ("dpo", ["--loss_type", "sigmoid,sft", "--loss_weights", "1.0"], ["loss_weights = [1.0]",
                                                                          "one weight per loss_type (2)"]),
    ],
)  # fmt: skip
def test_bad_value_names_key_value_and_what_is_accepted(stage, overrides, expected):
    message = error(stage, None, overrides)
    for part in expected:
        assert part in message
    assert "command line" in message


def test_bad_value_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "beta: 0\n")
    message = error("dpo", path)
    assert "beta = 0.0" in message and str(path) in message


@pytest.mark.parametrize("prompt", ["512", "600"])
def test_max_prompt_length_must_leave_room_for_a_completion(tmp_path, prompt):
    path = write(tmp_path, "max_length: 512\n")
    message = error("dpo", path, ["--max_prompt_length", prompt])
    assert f"max_prompt_length = {prompt} (on the command line)" in message
    assert f"max_length = 512 (in {path})" in message


def test_max_prompt_length_below_max_length_is_fine():
    assert load_config("dpo", None, ["--max_length=512", "--max_prompt_length=511"]).max_prompt_length == 511


@pytest.mark.parametrize(
    ("stage", "overrides", "both"),
    [
        ("sft", ["--bf16", "--fp16"], ("bf16", "fp16")),
        ("sft", ["--load_in_4bit"], ("load_in_4bit", "use_peft")),
        ("sft", ["--load_in_4bit", "--load_in_8bit", "--use_peft"], ("load_in_4bit", "load_in_8bit")),
        ("sft", ["--warmup_ratio=0.1", "--warmup_steps=10"], ("warmup_ratio", "warmup_steps")),
        ("sft", ["--dataset_name=a", "--dataset_mixer={b: 1.0}"], ("dataset_name", "dataset_mixer")),
        ("sft", ["--dataset_mixer={b: 1.0}", "--test_split_size=0.1"], ("test_split_size", "dataset_mixer")),
        (
            "dpo",
            ["--f_divergence_type=js_divergence", "--loss_type=bco_pair"],
            ("f_divergence_type", "loss_type"),
        ),
        (
            "dpo",
            ["--reference_free", "--ref_model_name_or_path=x"],
            ("reference_free", "ref_model_name_or_path"),
        ),
        (
            "dpo",
            ["--precompute_ref_log_probs", "--sync_ref_model"],
            ("precompute_ref_log_probs", "sync_ref_model"),
        ),
    ],
)
def test_contradicting_keys_are_refused(stage, overrides, both):
    message = error(stage, None, overrides)
    assert all(key in message for key in both) and "cannot be combined" in message


# ---------------------------------------------------------------------------------------------- registries


def test_an_optimizer_outside_the_table_is_refused_in_the_tables_words():
    """adamw_torch_xla is a transformers name the optimizer table does not build: refused at load, not at step 0."""
    with pytest.raises(ConfigError) as loop_error:
        optimizer_name(types.SimpleNamespace(optim="adamw_torch_xla"))
    message = error("sft", None, ["--optim=adamw_torch_xla"])
    assert str(loop_error.value) in message and "optim = 'adamw_torch_xla' (on the command line)" in message
    assert load_config("sft", None, ["--optim=paged_adamw_8bit"]).optim == "paged_adamw_8bit"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--loss_type=robust", "--label_smoothing=0.5"], "a number in [0, 0.5) for loss_type robust"),
        (["--loss_type=exo_pair"], "label_smoothing = 0.0 (the default) is out of range: expected a number in (0, 0.5]"),
        (["--loss_type=sigmoid,exo_pair", "--label_smoothing=0.6"], "[0, 0.5] for loss_type sigmoid"),
        (["--use_weighting", "--loss_type=sigmoid,aot_unpaired"], "aot_unpaired sorts the batch"),
    ],
)  # fmt: skip
def test_loss_rules_come_from_the_loss_registry(overrides, expected):
    assert expected in error("dpo", None, overrides)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_the_loader_and_check_loss_config_agree_on_every_loss(loss_type):
    """Both read objectives.LOSS_RULES: a value the loader takes builds an objective, one it refuses does not."""
    for smoothing in (-0.1, 0.0, 1e-3, 0.49, 0.5, 0.6):
        for divergence in ("reverse_kl", "js_divergence"):
            for weighting in (False, True):
                overrides = [f"--loss_type={loss_type}", f"--label_smoothing={smoothing}",
                             f"--f_divergence_type={divergence}", f"--use_weighting={weighting}"]  # fmt: skip
                try:
                    load_config("dpo", None, overrides)
                    loaded = True
                except ConfigError:
                    loaded = False
                try:
                    check_loss_config(loss_type, label_smoothing=smoothing, f_divergence_type=divergence,
                                      use_weighting=weighting)  # fmt: skip
                    checked = True
                except ConfigError:
                    checked = False
                assert loaded == checked, (smoothing, divergence, weighting)


def test_help_lists_the_registered_names():
    rows = {key: kind for key, kind, _ in describe_keys("dpo")}
    assert rows["loss_type"] == f"list[str] in {{{', '.join(LOSSES)}}}"
    assert rows["optim"] == f"str in {{{', '.join(OPTIMIZERS)}}}"
    assert rows["f_divergence_type"].startswith("str in {reverse_kl, forward_kl,")


def test_dataset_mixer_amounts(tmp_path):
    mixer = load_config("sft", None, ["--dataset_mixer={a: 0.5, b: 300.0, c: 1.0}"]).dataset_mixer
    assert mixer == {"a": 0.5, "b": 300, "c": 1.0} and type(mixer["b"]) is int and type(mixer["c"]) is float
    assert "a fraction in (0, 1] or a whole row count > 1" in error("sft", None, ["--dataset_mixer={a: 1.5}"])
    assert "a fraction in (0, 1]" in error("sft", None, ["--dataset_mixer={a: 0}"])


def test_dataset_mixture_forms(tmp_path):
    bare = write(
        tmp_path, "dataset_mixture:\n  - {path: data/x, name: default, split: train, fraction: 0.5}\n"
    )
    cfg = load_config("sft", bare)  # a bare list, with TRL's key spellings
    assert cfg.dataset_mixture == {
        "datasets": [{"id": "data/x", "config": "default", "split": "train", "weight": 0.5}]
    }
    typo = write(tmp_path, "dataset_mixture: {datasets: [{id: a, splt: train}]}\n", "typo.yaml")
    assert "Unknown key 'splt' in dataset_mixture.datasets[0]" in error("sft", typo)
    assert "did you mean 'split'?" in error("sft", typo)
    columns = write(
        tmp_path, "dataset_mixture: [{id: a, columns: [x]}, {id: b, columns: [y]}]\n", "cols.yaml"
    )
    assert "selects different columns in different entries" in error("sft", columns)
    assert "datasets[0].weight = 2.0 on the command line is out of range" in error(
        "sft", None, ["--dataset_mixture=[{id: a, weight: 2}]"]
    )
    assert "has no 'id'" in error("sft", None, ["--dataset_mixture=[{split: train}]"])
    assert "non-empty `datasets:` list" in error("sft", None, ["--dataset_mixture={seed: 1}"])


def test_chat_template_forms(tmp_path):
    template = write(tmp_path, "{{ messages }}", "t.jinja")
    assert load_config("sft", None, ["--chat_template", str(template)]).chat_template == str(template)
    assert load_config("sft", None, ["--chat_template", "{{ messages }}"]).chat_template == "{{ messages }}"
    assert "existing .jinja file" in error("sft", None, ["--chat_template", str(tmp_path / "missing.jinja")])
    assert "chat_template = 'chatml'" in error("sft", None, ["--chat_template", "chatml"])


# ---------------------------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path):
    message = error("sft", tmp_path / "nope.yaml")
    assert "nope.yaml does not exist" in message


@pytest.mark.parametrize(("text", "found"), [("- a\n- b\n", "a list"), ("42\n", "a int"), ("", "empty")])
def test_config_file_must_be_a_mapping(tmp_path, text, found):
    message = error("sft", write(tmp_path, text))
    assert "must be a YAML mapping" in message and found in message


def test_key_given_twice_in_a_file_is_refused(tmp_path):
    # PyYAML would silently keep the last value.
    message = error("sft", write(tmp_path, "seed: 1\nlearning_rate: 1.0e-5\nseed: 2\n"))
    assert "at line 3: 'seed' is given twice" in message


def test_invalid_yaml_names_the_line(tmp_path):
    message = error("sft", write(tmp_path, "seed: 1\nlearning_rate: [1\n"))
    assert "is not valid YAML at line" in message


def test_unknown_stage():
    assert "use one of: sft, dpo" in error("ppo")


# ---------------------------------------------------------------------------------------------- our recipes

STAGE_RECIPES = (
    sorted(RECIPES.glob("*/sft.yaml"))
    + sorted(RECIPES.glob("*/dpo.yaml"))
    + sorted(RECIPES.glob("*/simpo.yaml"))
    + sorted(RECIPES.glob("*/orpo.yaml"))
    + sorted(RECIPES.glob("*/kto.yaml"))
)


def test_recipe_folders_are_complete():
    folders = {p.parent.name for p in STAGE_RECIPES}
    assert folders == {"zephyr-7b-alpha", "zephyr-7b-beta", "smollm2-demo"}
    # SimPO and KTO from zephyr-7b-beta's SFT model, as their papers did; ORPO from its base model, as the ORPO paper did
    extra = {"zephyr-7b-beta": {"simpo.yaml", "orpo.yaml", "kto.yaml"}}
    for folder in folders:
        names = {p.name for p in (RECIPES / folder).iterdir()}
        assert names == {"sft.yaml", "dpo.yaml", "README.md", *extra.get(folder, ())}


def test_the_simpo_recipe_has_the_simpo_papers_mistral_base_numbers():
    """princeton-nlp/SimPO's training_configs/mistral-7b-base-simpo.yaml, in TRL CPOConfig's key names."""
    cfg = load_config("simpo", RECIPES / "zephyr-7b-beta" / "simpo.yaml")
    assert (cfg.loss_type, cfg.beta, cfg.simpo_gamma, cfg.cpo_alpha) == ("simpo", 2.0, 1.6, 0.0)
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.num_train_epochs) == (
        3e-7,
        "cosine",
        0.1,
        1,
    )
    assert cfg.global_batch_size(8) == 128 and (cfg.max_length, cfg.max_prompt_length) == (1024, 512)
    assert cfg.model_name_or_path == "alignment-handbook/zephyr-7b-sft-full" and cfg.seed == 42


def test_the_orpo_recipe_has_the_orpo_papers_mistral_orpo_beta_numbers():
    """xfactlab/orpo's scripts/run_mistral_orpo_beta.sh (on 4 GPUs, src/accelerate/fsdp.yaml), in TRL ORPOConfig's
    key names: from the base model, with the authors' `alpha` as beta."""
    cfg = load_config("orpo", RECIPES / "zephyr-7b-beta" / "orpo.yaml")
    assert cfg.model_name_or_path == "mistralai/Mistral-7B-v0.1" and cfg.beta == 0.1
    schedule = (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.num_train_epochs)
    assert schedule == (5e-6, "inverse_sqrt", 200, 5)
    assert cfg.global_batch_size(8) == 32 and (cfg.max_length, cfg.max_prompt_length) == (2048, 1792)
    datasets = [d["id"] for d in cfg.dataset_mixture["datasets"]]
    assert datasets == ["argilla/ultrafeedback-binarized-preferences-cleaned"]
    assert "<|user|>" in cfg.chat_template and cfg.bf16


def test_the_kto_recipe_has_the_kto_authors_numbers():
    """ContextualAI/HALOs's config/config.yaml, model/base_model.yaml, model/zephyr-sft-beta.yaml, loss/kto.yaml and
    launch.py (commit 00a123c), in TRL KTOConfig's key names."""
    cfg = load_config("kto", RECIPES / "zephyr-7b-beta" / "kto.yaml")
    assert cfg.model_name_or_path == "HuggingFaceH4/mistral-7b-sft-beta"
    assert (cfg.loss_type, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) == ("kto", 0.1, 1.0, 1.0)
    schedule = (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.num_train_epochs)
    assert schedule == (5e-6, "constant_with_warmup", 150, 1)
    assert (cfg.weight_decay, cfg.max_grad_norm, cfg.seed, cfg.max_length) == (0.01, 5.0, 1, 1024)
    assert cfg.global_batch_size(8) == 32 and cfg.per_device_train_batch_size >= 2


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    stage = path.stem
    cfg = load_config(stage, path)
    saved = config_to_dict(cfg)
    json.dumps(saved)  # serialisable as is
    again = load_config(stage, write(tmp_path, yaml.safe_dump(saved)))
    assert again == cfg


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_readme_gives_both_launch_commands(path):
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    assert f"zephyr {path.stem} --config {rel}" in readme
    assert re.search(
        rf"accelerate launch --config_file recipes/accelerate/\S+\.yaml.*\n?.*-m zephyr {path.stem}", readme
    )


def test_accelerate_configs_are_plain_accelerate_files():
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (RECIPES / "accelerate").glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp", "zero2", "zero3", "multi_cpu"}
    types = {name: c["distributed_type"] for name, c in configs.items()}
    assert types == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "multi_cpu": "MULTI_GPU"
    }  # fmt: skip
    assert configs["zero2"]["deepspeed_config"]["zero_stage"] == 2
    # ZeRO-3 with the alignment-handbook's keys (its recipes/accelerate_configs/zero3.yaml)
    assert configs["zero3"]["deepspeed_config"] == {
        "deepspeed_multinode_launcher": "standard", "offload_optimizer_device": "none", "offload_param_device": "none",
        "zero3_init_flag": True, "zero3_save_16bit_model": True, "zero_stage": 3,
    }  # fmt: skip
    assert configs["fsdp"]["fsdp_config"]["fsdp_version"] == 2
    assert configs["multi_cpu"]["num_processes"] == 2 and configs["multi_cpu"]["mixed_precision"] == "no"


@pytest.mark.slow
def test_accelerate_reads_our_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in (RECIPES / "accelerate").glob("*.yaml"):
        assert load_config_from_file(str(path)).num_processes >= 2


def test_alpha_dpo_recipe_has_the_model_card_numbers():
    cfg = load_config("dpo", RECIPES / "zephyr-7b-alpha" / "dpo.yaml")
    # The card: learning_rate 5e-07, train_batch_size 2, eval_batch_size 4, seed 42, 16 devices,
    # total_train_batch_size 32 (= 2 x 16), total_eval_batch_size 64 (= 4 x 16), Adam (0.9, 0.999) eps 1e-08,
    # linear schedule, warmup ratio 0.1, 1 epoch, evaluation every 100 steps.
    assert cfg.learning_rate == 5e-7
    assert cfg.per_device_train_batch_size == 2 and cfg.global_batch_size(16) == 32
    assert cfg.per_device_eval_batch_size * 16 == 64
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert (cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.num_train_epochs, cfg.seed) == (
        "linear",
        0.1,
        1.0,
        42,
    )
    assert (cfg.eval_strategy, cfg.eval_steps) == ("steps", 100)
    # The paper: beta 0.1, AdamW without weight decay; the handbook's DPO lengths.
    assert (cfg.beta, cfg.loss_type, cfg.optim, cfg.weight_decay) == (0.1, ["sigmoid"], "adamw_torch", 0.0)
    assert (cfg.max_length, cfg.max_prompt_length) == (1024, 512)
    assert cfg.dataset_name == "HuggingFaceH4/ultrafeedback_binarized"
    assert (cfg.dataset_train_split, cfg.dataset_test_split, cfg.chat_template) == (
        "train_prefs",
        "test_prefs",
        "zephyr",
    )
    sft = load_config("sft", RECIPES / "zephyr-7b-alpha" / "sft.yaml")
    assert cfg.model_name_or_path == sft.output_dir  # DPO starts from the SFT step's output


def test_alpha_sft_recipe_has_the_paper_numbers():
    cfg = load_config("sft", RECIPES / "zephyr-7b-alpha" / "sft.yaml")
    assert cfg.model_name_or_path == "mistralai/Mistral-7B-v0.1"
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio) == (2e-5, "cosine", 0.1)
    assert cfg.global_batch_size(16) == 512 and cfg.max_length == 2048 and cfg.num_train_epochs == 1.0
    assert (cfg.optim, cfg.weight_decay, cfg.bf16, cfg.seed) == ("adamw_torch", 0.0, True, 42)
    assert (cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_test_split) == (
        _UC,
        "train_sft",
        "test_sft",
    )


def test_beta_recipes_match_the_handbook_files():
    for stage in ("sft", "dpo"):
        ours = config_to_dict(load_config(stage, RECIPES / "zephyr-7b-beta" / f"{stage}.yaml"))
        theirs = config_to_dict(
            load_config(stage, FIXTURES / f"era4-zephyr-7b-beta-{stage}-config_full.yaml")
        )
        ours.pop("card")  # the model card's texts are Zephyr's addition; every training key is the handbook's
        theirs.pop("card")
        assert ours == theirs


def test_demo_recipes_chain_and_stay_small():
    sft = load_config("sft", RECIPES / "smollm2-demo" / "sft.yaml")
    dpo = load_config("dpo", RECIPES / "smollm2-demo" / "dpo.yaml")
    assert sft.model_name_or_path == "smollm2-135m-instruct" and dpo.model_name_or_path == sft.output_dir
    assert (sft.dataset_name, dpo.dataset_name) == ("data/demo/ultrachat", "data/demo/ultrafeedback")
    assert sft.max_length == dpo.max_length == 512 and sft.chat_template == dpo.chat_template == "auto"
    assert sft.output_dir.startswith("outputs/") and dpo.output_dir.startswith("outputs/")
    # the demo's budget: 15 minutes on 2 cores for everything (SFT ~6.5 s and DPO ~5.5 s a step, measured)
    assert 0 < sft.max_steps <= 20 and 0 < dpo.max_steps <= 60


# ---------------------------------------------------------------------------------------------- keys and helpers


def test_stage_keys():
    sft, dpo = set(config_keys("sft")), set(config_keys("dpo"))
    assert {"beta", "loss_type", "max_prompt_length", "ref_model_name_or_path"} <= dpo - sft
    assert {"packing", "assistant_only_loss", "dataset_text_field", "eos_token"} <= sft - dpo
    assert {
        "learning_rate",
        "max_length",
        "chat_template",
        "dataset_mixture",
        "lora_target_modules",
    } <= sft & dpo


def test_describe_keys_matches_the_defaults():
    for stage in ("sft", "dpo"):
        fresh = load_config(stage)
        rows = describe_keys(stage)
        assert [r[0] for r in rows] == config_keys(stage)
        assert all(getattr(fresh, key) == default for key, _, default in rows)
    rows = {key: (kind, default) for key, kind, default in describe_keys("dpo")}
    assert rows["beta"] == ("float", 0.1)
    assert rows["max_prompt_length"] == ("int | None", None)
    assert rows["lr_scheduler_type"][0].startswith("str in {linear, cosine,")


def test_stage_defaults_follow_trl():
    sft, dpo = load_config("sft"), load_config("dpo")
    assert (sft.learning_rate, dpo.learning_rate, dpo.beta, dpo.loss_type) == (2e-5, 1e-6, 0.1, ["sigmoid"])
    assert sft.model_name_or_path == dpo.model_name_or_path == "smollm2-135m-instruct"
    assert sft.bf16 is None and sft.assistant_only_loss is True and dpo.truncation_mode == "keep_start"


def test_warmup_and_global_batch_arithmetic():
    cfg = load_config("sft", None, ["--warmup_ratio", "0.1", "--per_device_train_batch_size=4"])
    assert cfg.num_warmup_steps(95) == 10  # ceil(9.5)
    assert cfg.global_batch_size(8) == 32
    assert load_config("sft", None, ["--warmup_steps", "7"]).num_warmup_steps(95) == 7
    assert load_config("sft", None, ["--warmup_steps", "0.25"]).num_warmup_steps(10) == 3  # ceil(2.5)
    assert load_config("sft").num_warmup_steps(100) == 0


def _installed_source(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(
        package
    )  # finds the package without importing it (importing costs seconds)
    return (Path(spec.submodule_search_locations[0]) / relative).read_text(encoding="utf-8")


def _enum_values(source: str, class_name: str) -> set[str]:
    body = source.split(f"class {class_name}(", 1)[1].split("\nclass ", 1)[0].split("\ndef ", 1)[0]
    return set(re.findall(r'^\s+[A-Z0-9_]+ = "([a-z0-9_]+)"', body, flags=re.M))


def test_vocabularies_match_installed_transformers_and_trl():
    assert _enum_values(_installed_source("transformers", "trainer_utils.py"), "SchedulerType") == set(
        LR_SCHEDULER_TYPES
    )
    # The optimizer table builds a subset of transformers' names (recipes keep their spelling); the rest are refused.
    assert set(OPTIMIZERS) <= _enum_values(
        _installed_source("transformers", "training_args.py"), "OptimizerNames"
    )
    dpo_config = _installed_source("trl", "trainer/dpo_config.py")
    assert all(f"`'{name}'`" in dpo_config for name in LOSSES)


def test_the_loader_types_every_mixture_entry_key_the_mixture_reader_takes():
    from zephyr import recipe
    from zephyr.data import mixing

    assert tuple(recipe._MIXTURE_ENTRY_HINTS) == mixing.MIXTURE_ENTRY_KEYS
    assert recipe.MIXTURE_KEYS is mixing.MIXTURE_KEYS


# ---------------------------------------------------------------------------------------------- CPO and SimPO


def test_cpo_and_simpo_defaults_follow_trl_cpo_config():
    """TRL 1.16's CPOConfig defaults for every key both have; SimPO is CPO with loss_type simpo and cpo_alpha 0."""
    cpo_config = pytest.importorskip("trl.experimental.cpo.cpo_config")
    import dataclasses

    theirs = {f.name: f.default for f in dataclasses.fields(cpo_config.CPOConfig)}
    cpo, simpo = load_config("cpo"), load_config("simpo")
    for key in ("learning_rate", "max_length", "max_completion_length", "beta", "label_smoothing", "loss_type",
                "disable_dropout", "cpo_alpha", "simpo_gamma"):  # fmt: skip
        assert getattr(cpo, key) == theirs[key], key
    assert (simpo.loss_type, simpo.cpo_alpha, simpo.simpo_gamma) == ("simpo", 0.0, 0.5)
    assert (cpo.output_dir, simpo.output_dir) == ("outputs/cpo", "outputs/simpo")
    for stage in ("cpo", "simpo"):
        fresh, rows = load_config(stage), describe_keys(stage)
        assert all(getattr(fresh, key) == default for key, _, default in rows)


@pytest.mark.parametrize(
    ("stage", "overrides", "expected"),
    [("cpo", ["--loss_type=sigmoid_norm"], "loss_type = 'sigmoid_norm' on the command line is not one of: sigmoid"),
     ("simpo", ["--loss_type", "hinge", "--label_smoothing=0.1"], "the hinge loss has no label smoothing"),
     ("simpo", ["--cpo_alpha=-1"], "cpo_alpha = -1.0 (on the command line) is out of range"),
     ("cpo", ["--beta=0"], "beta = 0.0 (on the command line) is out of range"),
     ("cpo", ["--max_prompt_length=64", "--max_length=64"], "must be less than max_length"),
     ("cpo", ["--rpo_alpha=1"], "'rpo_alpha' on the command line is a key of `zephyr dpo`, not of `zephyr cpo`"),
     ("simpo", ["--alpha=0.2"], "Unknown key 'alpha'"),
     ("sft", ["--simpo_gamma=1"], "'simpo_gamma' on the command line is a key of `zephyr cpo` and `zephyr simpo`, not of `zephyr sft`")],
)  # fmt: skip
def test_cpo_and_simpo_recipes_are_checked(stage, overrides, expected):
    assert expected in error(stage, None, overrides)


def test_a_dpo_loss_type_list_is_not_a_cpo_loss_type(tmp_path):
    """CPO takes one loss_type, as TRL's CPOConfig; a DPO-style list is refused, not silently joined."""
    message = error("cpo", write(tmp_path, "loss_type: [sigmoid, hinge]\n"))
    assert "loss_type" in message


# ---------------------------------------------------------------------------------------------- ORPO


def test_orpo_defaults_follow_trl_orpo_config():
    """TRL 1.16's ORPOConfig defaults for every key both have; --help lists the same defaults."""
    orpo_config = pytest.importorskip("trl.experimental.orpo.orpo_config")
    import dataclasses

    theirs = {f.name: f.default for f in dataclasses.fields(orpo_config.ORPOConfig)}
    orpo = load_config("orpo")
    for key in ("learning_rate", "max_length", "max_completion_length", "beta", "disable_dropout",
                "padding_value"):  # fmt: skip
        assert getattr(orpo, key) == theirs[key], key
    assert orpo.output_dir == "outputs/orpo"
    assert all(getattr(orpo, key) == default for key, _, default in describe_keys("orpo"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(["--beta=0"], "beta = 0.0 (on the command line) is out of range"),
     (["--max_prompt_length=64", "--max_length=64"], "must be less than max_length"),
     (["--padding_free=true"], "padding_free = True (on the command line) does not apply to ORPO"),
     (["--cpo_alpha=1"], "'cpo_alpha' on the command line is a key of `zephyr cpo` and `zephyr simpo`, not of `zephyr orpo`")],
)  # fmt: skip
def test_orpo_recipes_are_checked(overrides, expected):
    assert expected in error("orpo", None, overrides)


# ---------------------------------------------------------------------------------------------- KTO


def test_kto_defaults_follow_trl_kto_config():
    """TRL 1.16's KTOConfig defaults for every key both have, except the class weights, which Zephyr chooses from the
    class counts when unset (TRL: 1.0 and 1.0); --help lists the same defaults."""
    import dataclasses

    from trl import KTOConfig as TRLKTOConfig

    theirs = {f.name: f.default for f in dataclasses.fields(TRLKTOConfig)}
    kto = load_config("kto")
    shared = ("learning_rate", "max_length", "beta", "loss_type", "disable_dropout")
    for key in (*shared, "precompute_ref_log_probs"):
        assert getattr(kto, key) == theirs[key], key
    assert (kto.desirable_weight, kto.undesirable_weight) == (None, None)
    assert kto.output_dir == "outputs/kto"
    assert all(getattr(kto, key) == default for key, _, default in describe_keys("kto"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(["--beta=0"], "beta = 0.0 (on the command line) is out of range"),
     (["--loss_type=sigmoid"], "loss_type = 'sigmoid' on the command line is not one of: kto, apo_zero_unpaired"),
     (["--desirable_weight=0"], "desirable_weight = 0.0 (on the command line) is out of range"),
     (["--per_device_train_batch_size=1"], "is too small for loss_type kto"),
     (["--precompute_ref_log_probs=true"], "is not supported by zephyr kto yet"),
     (["--truncation_mode=keep_end"], "not of `zephyr kto`")],
)  # fmt: skip
def test_kto_recipes_are_checked(overrides, expected):
    assert expected in error("kto", None, overrides)


def test_apo_zero_unpaired_takes_a_batch_of_one():
    assert load_config("kto", None, ["--loss_type=apo_zero_unpaired", "--per_device_train_batch_size=1"])
