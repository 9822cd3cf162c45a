"""Atomic checkpoints: a checkpoint folder exists under its final name only once every byte of it is on disk.

Layout: `OUTPUT_DIR/checkpoint-{step}/` holds accelerate's state (model, optimizer, scheduler, RNG) and
`trainer_state.json` (step, epoch, position in the epoch, log history). It is written as `.checkpoint-{step}.tmp`,
fsynced, then renamed; a crash mid-write leaves only the temporary folder, which the next run deletes. A write that
fails (disk full, no permission) removes the temporary folder and stops the run with a `ZephyrError` that names the
checkpoint, the OS's reason and the previous checkpoint, which is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zephyr.config import config_to_dict
from zephyr.errors import ZephyrError
from zephyr.models import model_identity
from zephyr.train.run_folder import check_resume, fingerprint, recorded_fingerprint

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0  # epochs completed
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    total_tokens: int = 0
    max_steps: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, Any] | None = None  # the run's (run_folder.fingerprint); None in older checkpoints

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def fault_point(name: str) -> None:
    """Crash-test hook: `ZEPHYR_FAULT=NAME` makes the process kill itself at the named point (SIGKILL, as the OOM
    killer or a node failure would), `NAME/term` or `NAME/int` sends it SIGTERM (a scheduler about to preempt) or
    SIGINT (Ctrl-C), and `NAME/ENOSPC` (any errno name) raises that OSError there, as a full disk would.
    Points: `step:N` (inside optimizer step N, after its forward and backward), `checkpoint-write:N` (checkpoint N's
    model, optimizer and RNG files written, its trainer_state.json not yet), `checkpoint:N` (checkpoint N fully
    written but not yet renamed into place), `precompute` (during the reference pass), `reference-cache` (reference
    log-probs written to a temporary file, not yet renamed), `final-save`."""
    wanted = os.environ.get("ZEPHYR_FAULT")
    if not wanted:
        return
    point, _, how = wanted.partition("/")
    if point != name:
        return
    if how in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGINT)
    elif how in errno.errorcode.values():
        code = getattr(errno, how)
        raise OSError(code, os.strerror(code))
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_write_error(err: Exception) -> bool:
    """Whether ERR is a failed write: an OSError from Python, or the errors torch.save and safetensors turn one into
    (on a full disk torch's zip writer says "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534",
    safetensors "I/O error: No space left on device (os error 28)"). Anything else keeps its traceback."""
    from safetensors import SafetensorError

    if isinstance(err, OSError):
        return True
    if isinstance(err, SafetensorError):
        return "os error" in str(err)
    return isinstance(err, RuntimeError) and (
        "inline_container" in str(err) or "PytorchStreamWriter" in str(err)
    )


def write_error_reason(err: Exception, folder: Path) -> str:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    return f"{reason} ({free / 2**20:.0f} MiB free on that disk)"


def save_checkpoint(accelerator, state: TrainerState, output_dir: Path, save_total_limit: int | None) -> Path:
    """Write checkpoint-{state.global_step} atomically (all ranks call this; rank 0 renames) and rotate old ones.

    A failed write raises `ZephyrError` naming the checkpoint and the reason, after removing the temporary folder;
    no folder appears under the final name and older checkpoints are untouched."""
    final = output_dir / f"checkpoint-{state.global_step}"
    tmp = output_dir / f".checkpoint-{state.global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            fault_point(f"checkpoint-write:{state.global_step}")
            (tmp / STATE_FILE).write_text(state.to_json())
            _fsync_tree(tmp)
            fault_point(f"checkpoint:{state.global_step}")
            if final.exists():  # a checkpoint of the same step from an earlier, resumed run
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_error(err):
            raise
        previous = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise ZephyrError(
            f"could not write checkpoint {final}: {write_error_reason(err, output_dir)}; {kept}. Free space (or fix the "
            "folder's permissions) and run again with --resume_from_checkpoint true"
        ) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and save_total_limit:
        ours = [p for p in list_checkpoints(output_dir) if _fingerprint_of(p) == state.fingerprint]
        for old in ours[:-save_total_limit]:
            # Renamed first, so a run killed while deleting never leaves a half-deleted folder that still looks
            # complete; remove_partial_checkpoints clears what is left.
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def _fingerprint_of(checkpoint: Path) -> dict | None:
    try:
        return TrainerState.load(checkpoint).fingerprint
    except (OSError, ValueError, TypeError):
        return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete the folders left by a run killed while writing a checkpoint or deleting an old one."""
    if output_dir.is_dir():
        for p in [*output_dir.glob(".checkpoint-*.tmp"), *output_dir.glob(".checkpoint-*.deleting")]:
            shutil.rmtree(p, ignore_errors=True)


def resume_candidates(output_dir: Path, resume_from_checkpoint: str | bool | None) -> list[Path]:
    """Checkpoints to try, best first. `true` -> every complete checkpoint in OUTPUT_DIR, newest first (the loop
    falls back to an older one when a newer one cannot be read); a path -> that one; false / None -> none."""
    if resume_from_checkpoint in (None, False, "false", ""):
        return []
    if resume_from_checkpoint in (True, "true"):
        return list(reversed(list_checkpoints(output_dir)))
    path = Path(str(resume_from_checkpoint))
    if not (path / STATE_FILE).is_file():
        raise ZephyrError(
            f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE} in it)"
        )
    return [path]


# ---------------------------------------------------------------------------------------------- resume


def run_fingerprint(cfg, accelerator, data_identity: str | None) -> dict:
    """This run's fingerprint (`zephyr.train.run_folder.fingerprint`), kept in every checkpoint and the run record."""
    return fingerprint(
        config_to_dict(cfg),
        model=model_identity(cfg.model_name_or_path, cfg.model_revision),
        data=data_identity,
        num_processes=accelerator.num_processes,
    )


def resume(accelerator, cfg, run: dict, max_steps: int) -> TrainerState:
    """The state to start from: the newest checkpoint that loads (falling back to older ones when one cannot be
    read), or step 0 when resuming was not asked for, or asked for where no checkpoint exists yet. A checkpoint of
    another run (another fingerprint) is refused; so is a resume where checkpoints exist and none loads. A load
    that fails part-way is followed by a complete load of an older checkpoint, or by the error: training never
    continues from a half-loaded state."""
    output_dir = Path(cfg.output_dir)
    candidates = resume_candidates(output_dir, cfg.resume_from_checkpoint)
    fresh = TrainerState(max_steps=max_steps, fingerprint=run)
    if not candidates:
        if cfg.resume_from_checkpoint not in (None, False, "false", ""):
            check_resume(f"the run in {output_dir}", recorded_fingerprint(output_dir), run)
            accelerator.print(f"no checkpoint in {output_dir} yet: starting at step 0")
        return fresh
    failures = []
    for path in candidates:
        try:
            saved = TrainerState.load(path)  # read before anything loads into the model
        except (OSError, ValueError, TypeError) as err:
            failures.append(f"{path.name}: {type(err).__name__}: {err}")
            accelerator.print(f"checkpoint {path} is unreadable ({failures[-1]}); trying the previous one")
            continue
        check_resume(str(path), saved.fingerprint, run)
        try:
            accelerator.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable file means: try the previous checkpoint
            failures.append(f"{path.name}: {type(err).__name__}: {err}")
            accelerator.print(f"checkpoint {path} is unreadable ({failures[-1]}); trying the previous one")
            continue
        saved.max_steps, saved.fingerprint = max_steps, run
        accelerator.print(f"resumed from {path} at step {saved.global_step}")
        return saved
    raise ZephyrError(
        f"resume_from_checkpoint: no checkpoint in {output_dir} could be loaded ({'; '.join(failures)}); nothing "
        "was trained. Fix or remove the broken checkpoints, or start a new run with --overwrite_output_dir true"
    )
