"""`accelerate launch` of the zephyr CLI on CPU processes, for the distributed tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now. Launches must not share one: the rendezvous, and DeepSpeed's shared-memory
    all-reduce buffers (named after MASTER_PORT), would collide with another run's, e.g. a second test session's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(launcher_args: list[str], zephyr_args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCHER_ARGS --main_process_port PORT -m zephyr ZEPHYR_ARGS` from the repository root, on
    a free port, one thread a process; asserts that it succeeded, showing what it printed when not."""
    port = free_port()
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    command = [
        accelerate,
        "launch",
        *launcher_args,
        "--main_process_port",
        str(port),
        "-m",
        "zephyr",
        *zephyr_args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, launch_failure(done)
    return done


def launch_failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch printed, less DeepSpeed's and accelerate's routine lines."""
    noise = ("[20", "DeepSpeed deepspeed.ops", "  warnings.warn", "W1205", "Warning")
    lines = [line for line in (done.stdout + done.stderr).splitlines() if not line.startswith(noise)]
    return "\n".join([f"exit status {done.returncode}", *lines[-120:]])
