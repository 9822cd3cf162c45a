"""Checkpoints and exact resume, through the real CLI: a run killed (SIGKILL) inside a step or while writing a
checkpoint, or stopped by SIGTERM, resumes with `--resume_from_checkpoint true` and ends with the same metrics as an
uninterrupted run. Kills are injected with `ZEPHYR_FAULT` (see `zephyr.train.checkpoint.fault_point`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 6


def _write_prefs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(24):
            f.write(
                json.dumps(
                    {
                        "prompt": f"What is {i} + {i}?",
                        "chosen": f"{2 * i}.",
                        "rejected": f"I think it is {2 * i + 1}, or so.",
                    }
                )
                + "\n"
            )
    return folder


def _dpo(
    model: Path, data: Path, out: Path, *extra: str, fault: str | None = None, save_steps: int = 2
) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZEPHYR_FAULT=fault or "")
    cmd = [sys.executable, "-m", "zephyr", "dpo", f"--model_name_or_path={model}", f"--dataset_name={data}",
           f"--output_dir={out}", f"--max_steps={STEPS}", "--per_device_train_batch_size=2", "--learning_rate=1e-3",
           f"--save_steps={save_steps}", "--logging_steps=1", "--bf16=false", "--warmup_ratio=0.2", "--seed=3",
           "--gradient_checkpointing=false", "--max_length=64", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _steps(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def _same(a: dict, b: dict) -> None:
    for key in ("loss", "grad_norm", "learning_rate", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), key


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("resume")
    data = _write_prefs(tmp / "data")
    reference = tmp / "uninterrupted"
    done = _dpo(tiny_model_dir, data, reference)
    assert done.returncode == 0, done.stderr
    return tmp, data, _steps(reference)


@pytest.mark.parametrize(
    ("fault", "last_checkpoint"),
    [("step:5", 4), ("checkpoint:4", 2), ("final-save", 4)],
    ids=["mid-step", "mid-checkpoint-write", "mid-final-save"],
)
def test_sigkill_then_resume_matches_the_uninterrupted_run(setup, tiny_model_dir, fault, last_checkpoint):
    tmp, data, expected = setup
    out = tmp / fault.replace(":", "-")
    killed = _dpo(tiny_model_dir, data, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    complete = sorted(p.name for p in out.glob("checkpoint-*"))
    assert complete[-1] == f"checkpoint-{last_checkpoint}"
    assert not (out / "model.safetensors").exists() or fault == "final-save"

    resumed = _dpo(tiny_model_dir, data, out, "--resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / f'checkpoint-{last_checkpoint}'}" in resumed.stdout + resumed.stderr
    got = _steps(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        _same(got[step], expected[step])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob(".checkpoint-*.tmp")) and not (out / ".final.tmp").exists()


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes(setup, tiny_model_dir):
    tmp, data, expected = setup
    out = tmp / "sigterm"
    stopped = _dpo(tiny_model_dir, data, out, save_steps=100, fault="step:3/term")
    assert stopped.returncode == 143, stopped.stderr
    assert (out / "checkpoint-3").is_dir()  # not a save step: written because of the signal
    resumed = _dpo(tiny_model_dir, data, out, "--resume_from_checkpoint=true", save_steps=100)
    assert resumed.returncode == 0, resumed.stderr
    got = _steps(out)
    for step in range(1, STEPS + 1):
        _same(got[step], expected[step])
