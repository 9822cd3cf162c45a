"""A 2-process CPU run (torchrun, gloo) gives the same result as a 1-process run with the same global batch: the
same losses and metrics step by step (gradients are averaged over processes, metrics gathered over them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import free_port

pytestmark = pytest.mark.slow


def _prefs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(16):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Name {i} things.",
                        "chosen": "One, two." + " x" * (i % 5),
                        "rejected": f"No. {i}",
                    }
                )
                + "\n"
            )
    return folder


def _args(model: Path, data: Path, out: Path, batch: int) -> list[str]:
    return ["dpo", f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={out}",
            "--max_steps=3", f"--per_device_train_batch_size={batch}", "--learning_rate=1e-3", "--logging_steps=1",
            "--bf16=false", "--save_strategy=no", "--train_sampling_strategy=sequential", "--max_length=64",
            "--gradient_checkpointing=false"]  # fmt: skip


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun is not installed",
)
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    data = _prefs(tmp_path / "data")
    one = subprocess.run(
        [sys.executable, "-m", "zephyr", *_args(tiny_model_dir, data, tmp_path / "one", 4)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "zephyr",
            *_args(tiny_model_dir, data, tmp_path / "two", 2),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(single) == len(double) == 3
    for a, b in zip(single, double, strict=True):
        assert b["num_tokens"] == a["num_tokens"]  # both processes' tokens are counted
        for key in (
            "loss",
            "grad_norm",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logits/chosen",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert (tmp_path / "two" / "model.safetensors").is_file()


def _chats(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(8):
            answer = "Sure. " * (
                1 + 3 * (i % 3)
            )  # unequal assistant lengths: per-process token counts differ
            messages = [
                {"role": "user", "content": f"Say it {i} times."},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return folder


def test_accelerate_launch_sft_on_two_cpu_processes_matches_one_and_says_what_it_ran(
    tmp_path, tiny_model_dir
):
    """`accelerate launch` with an FSDP2 config and 2 processes on CPUs: the parameters are sharded for real
    (accelerate alone would run it as plain data parallelism), which zephyr says; the SFT loss is normalised by the
    tokens of both processes, so 2 x 2 rows give the 1 x 4 rows run's losses and gradient norms."""
    data = _chats(tmp_path / "chat")
    args = ["sft", f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={data}", "--max_steps=2",
            "--learning_rate=1e-3", "--logging_steps=1", "--bf16=false", "--save_strategy=no",
            "--train_sampling_strategy=sequential", "--max_length=128", "--gradient_checkpointing=false"]  # fmt: skip
    one = subprocess.run(
        [sys.executable, "-m", "zephyr", *args, "--per_device_train_batch_size=4", f"--output_dir={tmp_path / 'one'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        f"mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\nmain_process_port: {free_port()}\n"
    )
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    two = subprocess.run(
        [accelerate, "launch", "--config_file", str(config), "-m", "zephyr", *args,
         "--per_device_train_batch_size=2", f"--output_dir={tmp_path / 'two'}"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (
        "FSDP2 on 2 CPU process(es) (gloo): parameters, gradients and optimizer state sharded" in two.stdout
    )
    record = json.loads((tmp_path / "two" / "zephyr_run.json").read_text())
    assert record["num_processes"] == 2 and record["total_train_batch_size"] == 4
    assert record["distributed_type"] == "FSDP" and record["parameter_share_per_process"] < 0.6
    single, double = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(single) == len(double) == 2
    for a, b in zip(single, double, strict=True):
        assert b["num_tokens"] == a["num_tokens"]
        for key in ("loss", "grad_norm", "mean_token_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
