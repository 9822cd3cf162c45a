"""A run's folder holds one run (zephyr.train.run_folder): each reproduction of a wrong model or lost work that a
rerun or a resume used to cause, now refused or cleaned up; the run lock; what a push uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zephyr.errors import ZephyrError
from zephyr.train import run_folder
from zephyr.train.checkpoint import TrainerState, list_checkpoints, save_checkpoint


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZEPHYR_FAULT", raising=False)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.parent


@pytest.fixture
def chats(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(8)]  # fmt: skip
    return _jsonl(tmp_path / "chat" / "train.jsonl", rows)


@pytest.fixture
def prefs(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"It is {2 * i + 1}, I think."}
            for i in range(12)]  # fmt: skip
    return _jsonl(tmp_path / "prefs" / "train.jsonl", rows)


def _config(stage, model, data, out, *extra, save="no"):
    """A tiny run's config; EXTRA (`--key=value`) replaces a default of the same key."""
    from zephyr.recipe import load_config

    keys = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "max_steps": 2,
            "per_device_train_batch_size": 2, "learning_rate": 1e-3, "bf16": False, "gradient_checkpointing": False,
            "max_length": 64, "logging_steps": 1, "save_strategy": save}  # fmt: skip
    keys.update(e.removeprefix("--").split("=", 1) for e in extra)
    return load_config(stage, None, [f"--{k}={v}" for k, v in keys.items()])


def _sft(model, data, out, *extra):
    from zephyr.train.sft import run_sft

    return run_sft(_config("sft", model, data, out, *extra), progress=False)


def _dpo(model, data, out, *extra, save="no"):
    from zephyr.train.dpo import run_dpo

    return run_dpo(_config("dpo", model, data, out, *extra, save=save), progress=False)


# ---------------------------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_full_run_after_a_lora_run_is_refused_then_replaces_it_with_overwrite(
    tmp_path, tiny_model_dir, chats
):
    """The reproduction: a LoRA run, then a full run into the same folder used to leave the old adapter there,
    and `from_pretrained(O)` loaded it on the base model instead of the new full model."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "O"
    _sft(tiny_model_dir, chats, out, "--use_peft=true", "--lora_r=4")
    assert (out / "adapter_config.json").is_file()
    with pytest.raises(
        ZephyrError, match=r"holds another run's outputs \(.*adapter_config.json.*--overwrite_output_dir"
    ):
        _sft(tiny_model_dir, chats, out)
    assert (out / "adapter_config.json").is_file()  # the refusal touched nothing

    _sft(tiny_model_dir, chats, out, "--overwrite_output_dir=true")
    assert not list(out.glob("adapter*")) and (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(model, "peft_config")
    record = json.loads((out / "zephyr_run.json").read_text())
    assert record["config"]["use_peft"] is False and record["fingerprint"]["use_peft"] is False


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    out = tmp_path / "O"
    for name in (
        "model.safetensors",
        "metrics.jsonl",
        "rejects.jsonl",
        "README.md",
        "training.png",
        "notes.txt",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "checkpoint-6").mkdir()
    lock, notes = run_folder.claim(out, resume=False, overwrite=True)
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "removed the previous run's files" in notes[0]


def test_the_final_save_leaves_no_file_of_an_earlier_save(tmp_path, tiny_model_dir, chats):
    """Resumed or not, the final folder holds this save's files only: a stale adapter next to new full weights
    would be loaded in their place."""
    out = tmp_path / "O"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # as a crash between two final saves could leave it
    (out / "adapter_model.safetensors").write_text("x")
    _sft(tiny_model_dir, chats, out, "--resume_from_checkpoint=true")  # a resume may run into such a folder
    assert not list(out.glob("adapter*")) and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- resume


@pytest.fixture
def checkpointed(tmp_path, tiny_model_dir, prefs):
    """A finished 4-step DPO run that checkpointed at step 2."""
    out = tmp_path / "run"
    _dpo(tiny_model_dir, prefs, out, "--max_steps=4", "--save_steps=2", save="steps")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    return out


@pytest.mark.slow
def test_a_resume_under_other_settings_is_refused_naming_each_change(
    checkpointed, tiny_model_dir, prefs, capsys
):
    out = checkpointed
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(
        ZephyrError, match=r"cannot resume .*checkpoint-2.*learning_rate: 0.001 -> 0.005.*max_steps: 4 -> 5"
    ):
        _dpo(tiny_model_dir, prefs, out, "--max_steps=5", "--save_steps=2", "--resume_from_checkpoint=true",
             "--learning_rate=5e-3", save="steps")  # fmt: skip
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing was trained

    # Logging and save cadence may change.
    _dpo(tiny_model_dir, prefs, out, "--max_steps=4", "--logging_steps=2", "--resume_from_checkpoint=true")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_on_another_model_is_refused(checkpointed, tmp_path, prefs):
    """The reproduction: after --model_name_or_path changed, no checkpoint loaded and the run silently began again
    at step 0."""
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other-model", seed=7)
    with pytest.raises(ZephyrError, match=r"cannot resume .*model_identity.*model_name_or_path"):
        _dpo(other, prefs, checkpointed, "--max_steps=4", "--resume_from_checkpoint=true")


@pytest.mark.slow
def test_a_resume_where_no_checkpoint_loads_is_an_error_not_a_fresh_start(
    checkpointed, tiny_model_dir, prefs
):
    (checkpointed / "checkpoint-2" / "model.safetensors").write_bytes(b"\0" * 64)
    metrics = (checkpointed / "metrics.jsonl").read_text()
    with pytest.raises(
        ZephyrError, match=r"no checkpoint in .* could be loaded \(checkpoint-2: .*nothing was trained"
    ):
        _dpo(tiny_model_dir, prefs, checkpointed, "--max_steps=4", "--resume_from_checkpoint=true")
    assert (checkpointed / "metrics.jsonl").read_text() == metrics


def test_a_resume_with_no_checkpoint_yet_starts_at_step_0_and_says_so(
    tmp_path, tiny_model_dir, chats, capsys
):
    _sft(tiny_model_dir, chats, tmp_path / "new", "--resume_from_checkpoint=true")
    assert "no checkpoint in" in capsys.readouterr().out


class _Accelerator:
    """What save_checkpoint asks of accelerate, on one process."""

    is_main_process = True

    def wait_for_everyone(self):
        return None

    def save_state(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_text("weights")


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    """The reproduction: a second, shorter run's rotation counted the old run's checkpoint-6, deleted its own fresh
    ones and kept the old one, which `--resume_from_checkpoint true` then resumed."""
    other = TrainerState(global_step=6, fingerprint={"learning_rate": 1e-3})
    folder = tmp_path / "O"
    (folder / "checkpoint-6").mkdir(parents=True)
    (folder / "checkpoint-6" / "trainer_state.json").write_text(other.to_json())
    mine = {"learning_rate": 5e-3}
    for step in (1, 2, 3):
        save_checkpoint(_Accelerator(), TrainerState(global_step=step, fingerprint=mine), folder, 1)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-3", "checkpoint-6"]


# ---------------------------------------------------------------------------------------------- ownership


def test_a_second_live_run_is_refused_naming_the_first(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / "O" / run_folder.LOCK_FILE
        lock_file.parent.mkdir()
        owner = {"pid": sleeper.pid, "host": os.uname().nodename, "started": "today",
                 "process_start": run_folder._process_start(sleeper.pid)}  # fmt: skip
        lock_file.write_text(json.dumps(owner))
        with pytest.raises(
            ZephyrError, match=rf"in use by another run \(PID {sleeper.pid} on .*, started today\)"
        ):
            run_folder.claim(tmp_path / "O", resume=True, overwrite=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone: the lock is taken over, saying so, and released at the end.
    lock, notes = run_folder.claim(tmp_path / "O", resume=True, overwrite=False)
    assert notes == [f"took over the lock of a run that is no longer running (PID {sleeper.pid} on "
                     f"{os.uname().nodename}, started today)"]  # fmt: skip
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """A dead run's PID may be given to another process: the lock also records the process's start time."""
    lock_file = tmp_path / run_folder.LOCK_FILE
    owner = {"pid": os.getppid(), "host": os.uname().nodename, "started": "long ago", "process_start": "1"}
    lock_file.write_text(json.dumps(owner))
    lock, notes = run_folder.claim(tmp_path, resume=True, overwrite=False)
    lock.release()
    assert notes and notes[0].startswith("took over the lock of a run that is no longer running")


def test_a_lock_of_another_host_is_refused_with_what_to_do(tmp_path):
    (tmp_path / run_folder.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(ZephyrError, match=r"PID 1 on elsewhere.*If that run is no longer running, delete"):
        run_folder.claim(tmp_path, resume=True, overwrite=False)


@pytest.mark.slow
def test_a_finished_run_releases_its_lock(tmp_path, tiny_model_dir, chats):
    _sft(tiny_model_dir, chats, tmp_path / "O")
    assert not (tmp_path / "O" / run_folder.LOCK_FILE).exists()


def test_a_cli_run_on_a_locked_folder_exits_with_one_line(tmp_path, tiny_model_dir, chats):
    out = tmp_path / "O"
    out.mkdir()
    (out / run_folder.LOCK_FILE).write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "started": time.ctime(),
                "process_start": run_folder._process_start(os.getpid()),
            }
        )  # fmt: skip
    )
    done = subprocess.run(
        [sys.executable, "-m", "zephyr", "sft", f"--model_name_or_path={tiny_model_dir}",
         f"--dataset_name={chats}", f"--output_dir={out}", "--max_steps=1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"in use by another run (PID {os.getpid()}" in done.stderr and "Traceback" not in done.stderr
