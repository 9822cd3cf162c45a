"""Sharded weights for real, on 2 CPU processes: `accelerate launch` with the repository's own launch configs
(`recipes/accelerate/zero3.yaml`, DeepSpeed's CPU accelerator and gloo; `recipes/accelerate/fsdp.yaml`, FSDP2's
`fully_shard` over gloo). Each run must give the metrics of a 1-process run of the same global batch, hold about
half the parameters on each process, resume exactly from a checkpoint written sharded, and end in one consolidated
safetensors model that `transformers.pipeline` loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import accelerate_launch

pytestmark = pytest.mark.slow
deepspeed = pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_CONFIGS = {
    "zero3": ROOT / "recipes/accelerate/zero3.yaml",
    "fsdp": ROOT / "recipes/accelerate/fsdp.yaml",
    "zero2": ROOT / "recipes/accelerate/zero2.yaml",
}
DPO_METRICS = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
               "logits/chosen", "entropy", "num_tokens")  # fmt: skip
SFT_METRICS = ("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(tmp_path_factory.mktemp("zephyr-cache")))
        mp.delenv("ZEPHYR_FAULT", raising=False)
        yield


def launch(config: str, args: list[str], *, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/CONFIG.yaml -m zephyr ARGS` on PROCESSES CPU processes."""
    launcher = ["--config_file", str(LAUNCH_CONFIGS[config]), "--num_processes", str(processes)]
    return accelerate_launch(launcher, args)


def one_process(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zephyr", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: list[dict], want: list[dict], keys) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def record(out: Path) -> dict:
    return json.loads((out / "zephyr_run.json").read_text())


def prefs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(16):
            row = {
                "prompt": f"Name {i} things.",
                "chosen": "One, two." + " x" * (i % 5),
                "rejected": f"No. {i}",
            }
            f.write(json.dumps(row) + "\n")
    return folder


def dpo_args(model: Path, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["dpo", f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={out}",
            "--max_steps=3", f"--per_device_train_batch_size={batch}", "--learning_rate=1e-3", "--logging_steps=1",
            "--bf16=false", "--save_strategy=steps", "--save_steps=2", "--train_sampling_strategy=sequential",
            "--max_length=64", "--gradient_checkpointing=true", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def dpo_baseline(tmp_path_factory, tiny_model_dir):
    """One process, 4 pairs a step: what every 2 x 2 sharded run must reproduce."""
    root = tmp_path_factory.mktemp("dpo")
    data = prefs(root / "data")
    one_process(dpo_args(tiny_model_dir, data, root / "one", 4))
    return data, metrics(root / "one")


@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_sharded_dpo_matches_one_process_resumes_exactly_and_saves_one_model(
    config, tmp_path, tiny_model_dir, dpo_baseline
):
    data, want = dpo_baseline
    out = tmp_path / config
    # The reference: in the step under ZeRO-3 (a DeepSpeed inference engine), precomputed under FSDP2 (the
    # reference sharded by fully_shard, every process running as many batches); the same numbers either way.
    extra = ["--precompute_ref_log_probs=true"] if config == "fsdp" else []
    done = launch(config, dpo_args(tiny_model_dir, data, out, 2, *extra))
    assert (
        "ZeRO-3 on 2 CPU process(es)" if config == "zero3" else "FSDP2 on 2 CPU process(es)"
    ) in done.stdout
    assert_same_metrics(metrics(out), want, DPO_METRICS)
    run = record(out)
    assert run["num_processes"] == 2 and run["total_train_batch_size"] == 4
    assert run["parameter_share_per_process"] < 0.6  # each process held about half of the weights

    # One consolidated safetensors file of whole tensors, which a plain pipeline loads.
    from safetensors import safe_open
    from transformers import pipeline

    assert not list(out.glob("*.bin"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [64, 32]
    generator = pipeline("text-generation", model=str(out), device="cpu")
    assert generator("Hello", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("Hello")

    # The checkpoint written sharded at step 2 resumes to the uninterrupted run's step 3.
    assert (out / "checkpoint-2").is_dir()
    for name in ("model.safetensors", "metrics.jsonl"):
        (out / name).unlink()
    done = launch(config, dpo_args(tiny_model_dir, data, out, 2, *extra, "--resume_from_checkpoint=true"))
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    assert_same_metrics(metrics(out), want[2:], DPO_METRICS)


def test_zero2_matches_one_process(tmp_path, tiny_model_dir, dpo_baseline):
    """ZeRO-2 (weights replicated, gradients and optimizer state partitioned) on CPU processes: accelerate's
    process count is repaired as for ZeRO-3, so the data is split and the metrics are the 1-process run's."""
    data, want = dpo_baseline
    done = launch("zero2", dpo_args(tiny_model_dir, data, tmp_path / "zero2", 2))
    assert "DeepSpeed ZeRO-2 on 2 CPU process(es)" in done.stdout
    assert_same_metrics(metrics(tmp_path / "zero2"), want, DPO_METRICS)


def chats(folder: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            answer = "Sure. " * (1 + 3 * (i % 3))  # unequal lengths: the two processes count different tokens
            messages = [
                {"role": "user", "content": f"Say it {i} times."},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return folder


def test_zero3_sft_normalises_over_the_tokens_of_both_processes(tmp_path, tiny_model_dir):
    """DeepSpeed keeps the gradients in its engine; with one micro-batch a step the loss is divided by the tokens
    of all processes before backward, which gives the 1-process loss and gradient norm exactly."""
    data = chats(tmp_path / "chat")
    args = ["sft", f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={data}", "--max_steps=2",
            "--learning_rate=1e-3", "--logging_steps=1", "--bf16=false", "--save_strategy=no",
            "--train_sampling_strategy=sequential", "--max_length=128"]  # fmt: skip
    one_process([*args, "--per_device_train_batch_size=4", f"--output_dir={tmp_path / 'one'}"])
    launch("zero3", [*args, "--per_device_train_batch_size=2", f"--output_dir={tmp_path / 'two'}"])
    assert_same_metrics(metrics(tmp_path / "two"), metrics(tmp_path / "one"), SFT_METRICS)
    assert record(tmp_path / "two")["parameter_share_per_process"] < 0.6


def test_lora_under_fsdp2_matches_one_process_and_saves_the_adapter(tmp_path, tiny_model_dir):
    """LoRA on FSDP2-sharded base weights: the reference is the base model with the adapter off, computed in the
    step (the base is sharded only once training starts); the final folder is the adapter."""
    data = prefs(tmp_path / "data")
    lora = ["--use_peft=true", "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0"]

    one_process(dpo_args(tiny_model_dir, data, tmp_path / "one", 4, *lora))
    done = launch("fsdp", dpo_args(tiny_model_dir, data, tmp_path / "two", 2, *lora))
    assert "computed in each step (LoRA on sharded weights)" in done.stdout
    assert_same_metrics(metrics(tmp_path / "two"), metrics(tmp_path / "one"), DPO_METRICS)
    assert record(tmp_path / "two")["parameter_share_per_process"] < 0.6
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "two")
    assert any("lora_A" in name for name, _ in model.named_parameters())
