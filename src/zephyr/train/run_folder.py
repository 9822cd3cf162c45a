"""A run's folder holds one run: who owns it, what may be written into it, and what may be resumed from it.

- **Ownership.** The run's main process holds `OUTPUT_DIR/.zephyr-run.lock` (PID, host, start time) from set-up to
  the end. A second live run on the folder is refused; a lock left by a run that died on this host is taken over.
- **One run per folder.** A new run (not a resume) into a folder that holds another run's outputs is refused unless
  `overwrite_output_dir: true`, which first removes them (weights, adapters, checkpoints, metrics, rejects, results,
  card, plots).
- **Resume only what was started.** Every checkpoint, and `zephyr_run.json`, carries the run's fingerprint: what
  changes the math (model identity, data, tokenization, objective, optimizer, schedule, batch geometry, seed). A
  resume under another fingerprint is refused, naming each key that differs with both values.

`docs/reliability.md` lists the guarantees and the message of each refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from zephyr.errors import ZephyrError
from zephyr.run_record import RECORD_FILE, RunRecord

LOCK_FILE = ".zephyr-run.lock"


# What a run's final save writes (the folder `from_pretrained` loads), and what `push_to_hub` uploads: these plus
# the metrics log. Never checkpoints, rejected rows or the lock.
FINAL_SAVE = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_config.json", "adapter",
    "base_config", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "results.md", "README.md", "training.png", RECORD_FILE,
)  # fmt: skip
DELIVERABLES = (
    *(p for p in FINAL_SAVE if p not in ("adapter", "base_config")),
    "adapter/*",
    "base_config/*",
    "metrics.jsonl",
)


def final_save_files(folder: Path) -> list[Path]:
    """The files and folders of an earlier final save in FOLDER."""
    return sorted({path for pattern in FINAL_SAVE for path in folder.glob(pattern)})


# Config keys that change how a run is watched or where it reports, not its math: these may differ on resume.
MAY_CHANGE_ON_RESUME = frozenset({
    "logging_steps", "logging_strategy", "logging_first_step", "log_level", "eval_strategy", "eval_steps", "do_eval",
    "do_train", "per_device_eval_batch_size", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "run_name", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_private_repo", "card", "dataloader_num_workers", "dataset_num_proc",
    "ddp_timeout", "precompute_ref_batch_size", "generate_during_eval", "remove_unused_columns", "merge_adapter",
})  # fmt: skip


# What a training run writes into its folder: the final save, checkpoints, logs. Anything else is left alone.
RUN_OUTPUTS = (
    *FINAL_SAVE,
    "checkpoint-*",
    ".checkpoint-*",
    ".final*.tmp",
    "metrics.jsonl",
    "rejects.jsonl",
    "runs",
)


def run_outputs(folder: Path) -> list[Path]:
    """The files and folders in FOLDER that a training run wrote, sorted."""
    if not folder.is_dir():
        return []
    found = {path for pattern in RUN_OUTPUTS for path in folder.glob(pattern)}
    return sorted(found)


# ---------------------------------------------------------------------------------------------- ownership


def _process_start(pid: int) -> str | None:
    """The kernel's start time of PID (clock ticks since boot), which tells a live run from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    start = owner.get("process_start")
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """`OUTPUT_DIR/.zephyr-run.lock`, held by one run's main process; `release` removes it if it is still ours."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock, or raise naming the run that holds it. Returns a message when a dead run's lock was taken
        over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "process_start": _process_start(os.getpid()),
        }
        taken_over = None
        for _ in range(3):  # another run may take a stale lock between our look and our write: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                taken_over = self._check_owner()
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return taken_over
        raise ZephyrError(
            f"could not take the lock {self.path}: other runs keep starting on {self.path.parent}"
        )

    def _check_owner(self) -> str | None:
        """Raise if the lock's owner is a live run (or one on another host); describe a dead owner."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return f"took over {self.path}, which was unreadable (a run killed while writing it)"
        who = f"PID {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            return None  # an earlier run in this same process that ended with an error
        if owner.get("host") != socket.gethostname():
            raise ZephyrError(
                f"{self.path.parent} is in use by another run ({who}); wait for it to finish, or choose another "
                f"output_dir. If that run is no longer running, delete {self.path}"
            )
        if _alive(owner):
            raise ZephyrError(
                f"{self.path.parent} is in use by another run ({who}); wait for it to finish, or choose another "
                "output_dir"
            )
        return f"took over the lock of a run that is no longer running ({who})"

    def release(self) -> None:
        if not self.held:
            return
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


# ---------------------------------------------------------------------------------------------- one run per folder


def claim(folder: Path, *, resume: bool, overwrite: bool) -> tuple[RunLock, list[str]]:
    """Take FOLDER for a run: the lock, then, for a new run, the refusal or removal of another run's outputs.
    Returns the held lock and the lines to print. Main process only."""
    lock = RunLock(folder)
    note = lock.acquire()
    notes = [note] if note else []
    try:
        previous = [p for p in run_outputs(folder) if p.name != LOCK_FILE]
        if previous and not resume:
            names = ", ".join(p.name for p in previous[:6]) + (", ..." if len(previous) > 6 else "")
            if not overwrite:
                raise ZephyrError(
                    f"{folder} holds another run's outputs ({names}); pass --overwrite_output_dir true to replace "
                    "them, --resume_from_checkpoint true to continue that run, or choose another output_dir"
                )
            for path in previous:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            notes.append(f"overwrite_output_dir: removed the previous run's files from {folder} ({names})")
    except BaseException:
        lock.release()
        raise
    return lock, notes


# ---------------------------------------------------------------------------------------------- fingerprint


def fingerprint(config: dict, *, model: dict, data: str | None, num_processes: int) -> dict:
    """What makes a run's numbers what they are: the config less the keys that may change on resume, the model's
    identity (its files, or hub id and commit), the tokenized training data's content fingerprint, and the number
    of processes (batch geometry)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in MAY_CHANGE_ON_RESUME}
    whole = {**kept, "model_identity": model, "train_data": data, "num_processes": num_processes}
    return json.loads(json.dumps(whole, default=str))  # as a checkpoint stores it, so the two compare equal


def differences(before: dict, now: dict) -> list[str]:
    """`key: before -> now` for each key whose value differs."""
    keys = sorted(set(before) | set(now))
    return [
        f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}" for k in keys if before.get(k) != now.get(k)
    ]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def recorded_fingerprint(folder: Path) -> dict | None:
    """The fingerprint in FOLDER's `zephyr_run.json` (a finished run), or None."""
    try:
        return RunRecord.read(folder).fingerprint
    except ZephyrError:
        return None


def check_resume(what: str, before: dict | None, now: dict) -> None:
    """Refuse to resume WHAT (a checkpoint or a finished run) made under another fingerprint."""
    if before is None or before == now:
        return
    changed = differences(before, now)
    raise ZephyrError(
        f"cannot resume {what}: it was made by a different run. What differs (then -> now): {'; '.join(changed)}. "
        "Resume with the settings it was made with, or start a new run with --overwrite_output_dir true or "
        "another output_dir"
    )
