"""Run set-up choices: trackers from `report_to`, and where bf16 is used by default."""

from __future__ import annotations

import types

import pytest

from zephyr.errors import ConfigError
from zephyr.train import runtime


def test_report_to_keeps_installed_trackers_and_explains_missing_ones(monkeypatch, capsys):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: ["wandb"])
    assert runtime.report_trackers(["wandb", "tensorboard"]) == ["wandb"]
    assert "tensorboard not installed" in capsys.readouterr().out
    assert runtime.report_trackers(["none"]) == [] and runtime.report_trackers(None) == []


def test_report_to_refuses_a_tracker_accelerate_cannot_drive():
    with pytest.raises(ConfigError, match="report_to: azure_ml is not a tracker accelerate can drive"):
        runtime.report_trackers(["azure_ml"])


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
    assert runtime.use_bf16(types.SimpleNamespace(bf16=None)) is expected
    assert runtime.use_bf16(types.SimpleNamespace(bf16=False)) is False  # the recipe wins
