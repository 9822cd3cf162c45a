"""Checkpoints and exact resume, through the real CLI: a run killed (SIGKILL) inside a step, while writing a
checkpoint (some files written, or all written but not renamed), during the reference log-prob pass, during the final
save, or at seeded-random points twice in a row, or stopped by SIGTERM or SIGINT, resumes with
`--resume_from_checkpoint true` and ends with the same metrics as an uninterrupted run. Kills are injected with
`ZEPHYR_FAULT` (see `zephyr.train.checkpoint.fault_point`). The killed runs are CLI subprocesses; some resumes run
in this process (`_dpo_here`), which saves an interpreter start-up (~13 s) each."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from zephyr.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

STEPS = 6
# Where a run of STEPS steps that checkpoints every 2 can be killed, in the order it gets there.
POINTS = ("step:1", "step:2", "checkpoint-write:2", "checkpoint:2", "step:3", "step:4", "checkpoint-write:4",
          "checkpoint:4", "step:5", "step:6", "final-save")  # fmt: skip
# Seeds for the random kill points; ZEPHYR_FAULT_SEEDS=1,2,3 tries others (each costs about 50 s).
SEEDS = [int(s) for s in os.environ.get("ZEPHYR_FAULT_SEEDS", "2024").split(",")]


def last_complete_checkpoint(point: str) -> int | None:
    """The newest checkpoint renamed into place before POINT (`checkpoint:N` is reached just before N's rename)."""
    done = [int(p.split(":")[1]) for p in POINTS[: POINTS.index(point)] if p.startswith("checkpoint:")]
    return done[-1] if done else None


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    """Tokenized data and reference log-probs go to a cache of this module's own; no fault unless a test asks."""
    path = tmp_path_factory.mktemp("zephyr-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(path))
        mp.delenv("ZEPHYR_FAULT", raising=False)
        yield path


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


def _args(model: Path, data: Path, out: Path, *extra: str, save_steps: int = 2) -> list[str]:
    return [f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={out}",
            f"--max_steps={STEPS}", "--per_device_train_batch_size=2", "--learning_rate=1e-3",
            f"--save_steps={save_steps}", "--logging_steps=1", "--bf16=false", "--warmup_ratio=0.2", "--seed=3",
            "--gradient_checkpointing=false", "--max_length=64", *extra]  # fmt: skip


def _dpo(
    model: Path, data: Path, out: Path, *extra: str, fault: str | None = None, save_steps: int = 2
) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZEPHYR_FAULT=fault or "")
    cmd = [sys.executable, "-m", "zephyr", "dpo", *_args(model, data, out, *extra, save_steps=save_steps)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _dpo_here(model: Path, data: Path, out: Path, *extra: str, save_steps: int = 2):
    """`_dpo` without a fault, run in this process: the same code after the CLI's parsing (and the same metrics,
    bit for bit), without the interpreter start-up. Returns the stage's `TrainResult`."""
    from zephyr.recipe import load_config
    from zephyr.train.dpo import run_dpo

    cfg = load_config("dpo", None, _args(model, data, out, *extra, save_steps=save_steps))
    return run_dpo(cfg, progress=False)


def _steps(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def _same(a: dict, b: dict) -> None:
    for key in ("loss", "grad_norm", "learning_rate", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), key


def _matches_uninterrupted(out: Path, expected: dict[int, dict]) -> None:
    got = _steps(out)
    assert sorted(got) == list(range(1, STEPS + 1))  # each step logged once: the redone ones replaced
    for step in range(1, STEPS + 1):
        _same(got[step], expected[step])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob(".checkpoint-*")) and not (out / ".final.tmp").exists()


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
    [("step:5", 4), ("checkpoint-write:4", 2), ("checkpoint:4", 2), ("final-save", 4)],
    ids=["mid-step", "mid-checkpoint-files", "mid-checkpoint-write", "mid-final-save"],
)
def test_sigkill_then_resume_matches_the_uninterrupted_run(setup, tiny_model_dir, fault, last_checkpoint):
    tmp, data, expected = setup
    out = tmp / fault.replace(":", "-")
    killed = _dpo(tiny_model_dir, data, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    complete = sorted(p.name for p in out.glob("checkpoint-*"))
    assert complete[-1] == f"checkpoint-{last_checkpoint}"
    assert not (out / "model.safetensors").exists() or fault == "final-save"
    if fault == "checkpoint-write:4":  # killed with model and optimizer written, trainer_state.json not yet
        partial = out / ".checkpoint-4.tmp"
        assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()

    resumed = _dpo(tiny_model_dir, data, out, "--resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / f'checkpoint-{last_checkpoint}'}" in resumed.stdout + resumed.stderr
    _matches_uninterrupted(out, expected)


@pytest.mark.parametrize("how", ["term", "int"])
def test_sigterm_or_sigint_checkpoints_at_the_step_boundary_and_resumes(setup, tiny_model_dir, how, capsys):
    tmp, data, expected = setup
    out = tmp / f"sig{how}"
    stopped = _dpo(tiny_model_dir, data, out, save_steps=100, fault=f"step:3/{how}")
    assert stopped.returncode == 143, stopped.stderr  # our clean exit after a signal, not death by the signal
    assert "stopped at step 3; resume with --resume_from_checkpoint true" in stopped.stdout
    # step 3 is not a save step: its checkpoint is there because of the signal
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists()
    _dpo_here(tiny_model_dir, data, out, "--resume_from_checkpoint=true", save_steps=100)
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    _matches_uninterrupted(out, expected)


def test_sigkill_during_the_reference_pass_computes_it_again(setup, tiny_model_dir, cache, capsys):
    """Killed while the reference model's log-probs are being precomputed: nothing is cached and no checkpoint
    exists, so the next run computes them from the start and trains from step 1, with the metrics of a run that
    was never interrupted (and reuses the cache the resumed run wrote)."""
    tmp, data, _ = setup
    out = tmp / "precompute"
    killed = _dpo(tiny_model_dir, data, out, "--precompute_ref_log_probs=true", fault="precompute")
    assert killed.returncode == -signal.SIGKILL
    assert "reference log-probs" in killed.stderr  # it got as far as the reference pass
    assert not list((cache / "ref_logps").glob("*.pt")) and not list_checkpoints(out)

    _dpo_here(tiny_model_dir, data, out, "--precompute_ref_log_probs=true", "--resume_from_checkpoint=true")
    printed = capsys.readouterr().out
    assert "reusing" not in printed and "resumed from" not in printed
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 1  # the train split's, now complete
    whole = tmp / "precompute-whole"
    _dpo_here(tiny_model_dir, data, whole, "--precompute_ref_log_probs=true")
    assert "reusing" in capsys.readouterr().out
    _matches_uninterrupted(out, _steps(whole))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: f"seed{seed}")
def test_two_sigkills_at_seeded_random_points_then_resume(setup, tiny_model_dir, seed, capsys):
    """Two kill points drawn from POINTS with SEED: the run dies at the first, the resumed run at the second (a
    point it reaches again after going back to the last complete checkpoint), and a third run finishes."""
    tmp, data, expected = setup
    out = tmp / f"random-{seed}"
    first, second = (POINTS[i] for i in sorted(random.Random(seed).sample(range(len(POINTS)), 2)))
    for point in (first, second):
        killed = _dpo(tiny_model_dir, data, out, "--resume_from_checkpoint=true", fault=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        last = last_complete_checkpoint(point)
        assert [p.name for p in list_checkpoints(out)][-1:] == ([f"checkpoint-{last}"] if last else []), point

    _dpo_here(tiny_model_dir, data, out, "--resume_from_checkpoint=true")
    printed = capsys.readouterr().out
    last = last_complete_checkpoint(second)
    assert (f"resumed from {out / f'checkpoint-{last}'} at step {last}" in printed) == (last is not None)
    _matches_uninterrupted(out, expected)
