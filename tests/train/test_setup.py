"""Run set-up choices (zephyr.train.setup): trackers from `report_to`, where bf16 is used by default, keys the
machine cannot honour, the optimizer table, and launch configs that cannot be honoured."""

from __future__ import annotations

import types

import pytest

from zephyr.errors import ConfigError
from zephyr.train import setup as train_setup


def test_report_to_keeps_installed_trackers_and_explains_missing_ones(monkeypatch, capsys):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: ["wandb"])
    assert train_setup.report_trackers(["wandb", "tensorboard"]) == ["wandb"]
    assert "tensorboard not installed" in capsys.readouterr().out
    assert train_setup.report_trackers(["none"]) == [] and train_setup.report_trackers(None) == []


def test_report_to_refuses_a_tracker_accelerate_cannot_drive():
    with pytest.raises(ConfigError, match="report_to: azure_ml is not a tracker accelerate can drive"):
        train_setup.report_trackers(["azure_ml"])


@pytest.mark.parametrize(
    ("flags", "expected"), [("avx2 fma", False), ("avx2 avx512_bf16", True), ("amx_bf16", True)]
)
def test_bf16_by_default_only_where_the_cpu_runs_it_fast(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t: {flags}\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k),
    )
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert train_setup.use_bf16(types.SimpleNamespace(bf16=None)) is expected
    assert train_setup.use_bf16(types.SimpleNamespace(bf16=False)) is False  # the recipe wins


def _optim_cfg(optim: str):
    return types.SimpleNamespace(
        weight_decay=0.1, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim=optim
    )


def _recipe(**keys):
    base = dict(bf16=None, dtype="float32", attn_implementation=None)
    return types.SimpleNamespace(**{**base, **keys})


def test_keys_this_machine_cannot_honour_resolve_with_a_note_each(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(train_setup, "cpu_has_fast_bf16", lambda: False)
    cfg = _recipe(bf16=True, dtype="bfloat16", attn_implementation="flash_attention_2")
    notes = train_setup.resolve_for_machine(cfg)
    assert (cfg.bf16, cfg.dtype, cfg.attn_implementation) == (False, "float32", "sdpa")
    assert len(notes) == 3 and all(n.startswith("note: ") for n in notes)
    assert "bf16: true" in notes[0] and "dtype: bfloat16" in notes[1] and "flash_attention_2" in notes[2]


def test_a_cpu_with_bf16_arithmetic_keeps_the_recipes_bf16(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(train_setup, "cpu_has_fast_bf16", lambda: True)
    cfg = _recipe(bf16=True, dtype="bfloat16", attn_implementation="sdpa")
    assert train_setup.resolve_for_machine(cfg) == []
    assert (cfg.bf16, cfg.dtype, cfg.attn_implementation) == (True, "bfloat16", "sdpa")


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adamw_uses_the_fused_kernel_on_cpu_and_it_steps_like_foreach(optim):
    """Fused AdamW runs on CPUs too (0.13 s against foreach's 0.87 s a step on 135M parameters, 520 MB less peak
    memory: benchmarks/optimizer_step.py); it must give foreach's update."""
    import torch

    from tiny import tiny_model
    from zephyr.train.optimizers import build_optimizer

    models = [tiny_model(seed=3), tiny_model(seed=3)]
    fused = build_optimizer(models[0], _optim_cfg(optim))
    groups = build_optimizer(models[1], _optim_cfg(optim)).param_groups
    foreach = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=1e-2, foreach=True
    )
    assert fused.defaults["fused"] is True
    for step in range(3):
        for m, opt in zip(models, (fused, foreach), strict=True):
            torch.manual_seed(step)
            m(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "optim, cls", [("rmsprop", "RMSprop"), ("sgd", "SGD"), ("adagrad", "Adagrad"), ("adafactor", "Adafactor")]
)
def test_other_optimizers_are_the_ones_named_with_decay_on_the_decaying_groups_only(optim, cls):
    from tiny import tiny_model
    from zephyr.train.optimizers import build_optimizer

    optimizer = build_optimizer(tiny_model(), _optim_cfg(optim))
    assert type(optimizer).__name__ == cls
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]
    assert all(g["lr"] == 1e-2 for g in optimizer.param_groups)


def test_an_optimizer_zephyr_does_not_build_is_refused_before_anything_loads(tmp_path):
    from zephyr.recipe import load_config

    with pytest.raises(
        ConfigError, match="optim: lion_32bit .* use one of adamw_torch, adamw_torch_fused, sgd"
    ):
        load_config("sft", None, ["--optim=lion_32bit", f"--output_dir={tmp_path}"])


def test_an_fsdp1_config_on_cpus_says_it_runs_replicated(monkeypatch):
    """FSDP2 is made to shard on CPU processes; FSDP version 1 is not, and the run says so instead of pretending."""
    from accelerate.utils import DistributedType

    from zephyr.train.distributed import honour_launch_config

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.MULTI_CPU, num_processes=1, mixed_precision="no"
    )
    note = honour_launch_config(accelerator)
    assert note.startswith("note: the launch config asks for FSDP version 1") and "weights replicated" in note
