"""DPO training throughput and memory: `zephyr dpo` against TRL's DPOTrainer, same model, data, order and settings.

    python benchmarks/dpo_throughput.py                      # CPU: embedded SmolLM2-135M, batch 2, max_length 1024
    python benchmarks/dpo_throughput.py --steps 4 --rounds 2 --only zephyr,trl-best
    python benchmarks/dpo_throughput.py --model random-mistral-1b --max-length 2048   # on a GPU

Each trainer runs in its own process (so peak memory is its own), the contenders alternate A/B/C for `--rounds`
rounds, and in each run the first `--warmup` steps are not timed. The data is synthetic preference pairs whose
token lengths are drawn like UltraFeedback's (prompt median ~150 tokens, completions ~250, long tails up to
max_length), in a fixed order. Contenders:

    zephyr            zephyr dpo, fast path: prefix sharing + padding-free packing with per-pair attention,
                      precomputed reference, gradient checkpointing (as TRL's default, for memory)
    zephyr-no-X       the same with one optimisation off, X in share, precompute, gc, pairattn (the ablation;
                      no-pairattn: the packed row's block mask goes to sdpa whole)
    zephyr-plain      zephyr dpo with TRL's layout (two padded rows per pair), frozen reference, checkpointing
    trl-default       TRL DPOTrainer with its defaults (bf16, gradient checkpointing)
    trl-best          TRL with its best options here: fp32 on CPUs without fast bf16, no gradient checkpointing,
                      precomputed reference, padding_free (use_liger_kernel too when liger-kernel is installed)

All use fp32 on a CPU without AVX512-BF16/AMX except trl-default, whose default is bf16. Printed: seconds per step
(median over timed steps of all rounds), pairs/s, tokens/s (the tokens of both sequences of each pair, as TRL's
num_tokens counts them), peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on GPU), the ratio to
each TRL run, and on a GPU the model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("zephyr", "trl-default", "trl-best", "zephyr-plain")
# zephyr's optimisations, each switchable for the ablation: `zephyr-no-share`, `zephyr-no-precompute`, `zephyr-no-gc`
ZEPHYR_OPTIONS = {
    "share": "prefix_sharing",
    "precompute": "precompute_ref_log_probs",
    "gc": "gradient_checkpointing",
}
# and `zephyr-no-pairattn`: prefix sharing with its block mask through sdpa instead of the per-pair attention
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us great old year off "
    "come since against go came right used take three"
).split()


# ---------------------------------------------------------------------------------------------- data


def _length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(median * math.exp(rng.gauss(0.0, sigma)))))


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def preference_rows(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """N conversational pairs, lengths in words (about one token each) drawn like UltraFeedback's; prompts stay
    within 60% of max_length so that every pair keeps some completion (both trainers then see the same tokens)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _text(rng, _length(rng, 150, 0.8, 8, min(1000, int(0.6 * max_length))))
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": _text(rng, _length(rng, 250, 0.6, 4, 1000))}],
                "rejected": [{"role": "assistant", "content": _text(rng, _length(rng, 250, 0.6, 4, 1000))}],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- workers


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _common(args) -> dict:
    return dict(
        learning_rate=5e-7,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        max_length=args.max_length,
        beta=0.1,
        seed=0,
        logging_steps=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )


def zephyr_options(name: str) -> dict[str, bool]:
    """Recipe switches of a zephyr contender name."""
    if name == "zephyr-plain":
        return {"prefix_sharing": False, "precompute_ref_log_probs": False, "gradient_checkpointing": True}
    options = {key: True for key in ZEPHYR_OPTIONS.values()}
    for off in name.split("-no-")[1:]:
        if off != "pairattn":
            options[ZEPHYR_OPTIONS[off]] = False
    return options


def run_zephyr(
    args, data_dir: Path, out: Path, *, options: dict[str, bool], pair_attention: bool = True
) -> list[float]:
    import zephyr.train.loop as loop
    import zephyr.train.pair_attention
    from zephyr.recipe import load_config
    from zephyr.train.dpo import run_dpo

    if not pair_attention:  # the ablation: the packed row's block mask goes to sdpa whole
        zephyr.train.pair_attention.enable = lambda model: False

    marks: list[float] = []
    original = loop.fault_point

    def mark(point: str) -> None:  # the loop calls fault_point("step:N") once per optimizer step
        if point.startswith("step:"):
            marks.append(time.perf_counter())
        original(point)

    loop.fault_point = mark
    settings = {
        **_common(args),
        "model_name_or_path": args.model_path,
        "dataset_name": data_dir,
        "output_dir": out,
        "train_sampling_strategy": "sequential",
        "save_strategy": "no",
        "report_to": "none",
        "chat_template": "auto",
        "auto_insert_empty_system_msg": "false",
        **{key: str(value).lower() for key, value in options.items()},
    }
    cfg = load_config("dpo", None, [f"--{k}={v}" for k, v in settings.items()])
    run_dpo(cfg, progress=False)
    return marks


def run_trl(args, rows: list[dict], out: Path, *, best: bool) -> list[float]:
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from zephyr.train.setup import cpu_has_fast_bf16

    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    options: dict = {}
    if best:
        fast_bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()
        options = dict(
            bf16=fast_bf16,
            gradient_checkpointing=False,
            precompute_ref_log_probs=True,
            padding_free=True,
            use_liger_kernel=importlib.util.find_spec("liger_kernel") is not None,
        )
    config = DPOConfig(
        output_dir=str(out),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        **_common(args),
        **options,
    )
    trainer = DPOTrainer(
        model=args.model_path, args=config, train_dataset=Dataset.from_list(rows), callbacks=[Marks()]
    )
    trainer.train()
    return marks


def worker(args) -> None:
    rows = json.loads(Path(args.data).read_text())
    data_dir = Path(args.data).parent / "jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        if args.worker.startswith("zephyr"):
            marks = run_zephyr(
                args, data_dir, out, options=zephyr_options(args.worker),
                pair_attention="-no-pairattn" not in args.worker,
            )  # fmt: skip
        else:
            marks = run_trl(args, rows, out, best=args.worker == "trl-best")
        total = time.perf_counter() - start
    step_times = (
        [b - a for a, b in zip(marks, marks[1:], strict=False)][args.warmup - 1 :] if args.warmup else []
    )
    print("RESULT " + json.dumps({"step_times": step_times, "peak_mb": _peak_memory_mb(), "total_s": total}))


# ---------------------------------------------------------------------------------------------- orchestration


def _prepare_model(name: str) -> str:
    if name == "embedded":
        from zephyr.fetch import fetch_embedded_model

        return str(fetch_embedded_model())
    if name == "random-mistral-1b":  # weights do not change speed; a 1.1B Mistral-architecture model
        import torch
        from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

        from zephyr.fetch import fetch_embedded_model

        folder = Path(tempfile.gettempdir()) / "zephyr-bench-mistral-1b"
        if not (folder / "config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(fetch_embedded_model())  # any chat tokenizer will do
            config = MistralConfig(
                vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            torch.manual_seed(0)
            MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return str(folder)
    return name


def _pair_tokens(model_path: str, rows: list[dict], max_length: int) -> list[int]:
    """Tokens of both sequences of each pair after truncation, as TRL's num_tokens counts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    counts = []
    for r in rows:
        total = 0
        for side in ("chosen", "rejected"):
            text = tok.apply_chat_template(r["prompt"] + r[side], tokenize=False)
            total += min(len(tok(text, add_special_tokens=False)["input_ids"]), max_length)
        counts.append(total)
    return counts


def _model_flops_per_token(model_path: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in Path(model_path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def _matmul_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded", help="embedded, random-mistral-1b, or a model folder")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="A/B/C rounds")
    parser.add_argument("--only", default=",".join(CONTENDERS[:3]), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import platform

    import torch

    contenders = [c.strip() for c in args.only.split(",") if c.strip()]
    model_path = _prepare_model(args.model)
    n_pairs = args.batch_size * (args.warmup + args.steps)
    rows = preference_rows(n_pairs, args.max_length)
    tokens = _pair_tokens(model_path, rows, args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.json"
        data.write_text(json.dumps(rows))
        (Path(tmp) / "jsonl").mkdir()
        (Path(tmp) / "jsonl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results: dict[str, list[dict]] = {c: [] for c in contenders}
        for round_ in range(args.rounds):
            for name in contenders:
                command = [
                    sys.executable, __file__, "--worker", name, "--data", str(data), "--model-path", model_path,
                    "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                    "--steps", str(args.steps), "--warmup", str(args.warmup),
                ]  # fmt: skip
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
                done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode != 0 or line is None:
                    sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
                results[name].append(json.loads(line[len("RESULT ") :]))
                print(f"  {name}: {line[len('RESULT ') :]}", flush=True)  # survives an interrupted benchmark

    timed_tokens = tokens[args.batch_size * args.warmup :]
    tokens_per_step = sum(timed_tokens) / args.steps
    rows_out = {}
    for name, runs in results.items():
        step = statistics.median(t for r in runs for t in r["step_times"])
        rows_out[name] = {
            "s_per_step": step,
            "pairs_per_s": args.batch_size / step,
            "tokens_per_s": tokens_per_step / step,
            "peak_mb": max(r["peak_mb"] for r in runs),
            "total_s": statistics.median(r["total_s"] for r in runs),
        }
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"
    )
    print(f"\nDPO throughput: {args.model}, batch {args.batch_size}, max_length {args.max_length}, {device}")
    print(
        f"mean tokens per pair (both sequences): {sum(tokens) / len(tokens):.0f}; timed steps per run: {args.steps} x {args.rounds} rounds\n"
    )
    header = (
        f"{'contender':22s} {'s/step':>8s} {'pairs/s':>8s} {'tokens/s':>9s} {'peak MB':>8s} {'run s':>7s}"
    )
    baselines = [b for b in ("trl-default", "trl-best") if b in rows_out]
    header += "".join(f" {'x ' + b:>15s}" for b in baselines)
    print(header)
    for name, r in rows_out.items():
        line = f"{name:22s} {r['s_per_step']:8.2f} {r['pairs_per_s']:8.3f} {r['tokens_per_s']:9.0f} {r['peak_mb']:8.0f} {r['total_s']:7.0f}"
        for b in baselines:
            ratio_speed = r["pairs_per_s"] / rows_out[b]["pairs_per_s"]
            ratio_mem = r["peak_mb"] / rows_out[b]["peak_mb"]
            line += f" {ratio_speed:6.2f}x {ratio_mem:5.2f}m"
        print(line)
    if baselines:
        print("\n(x B: pairs/s relative to B; m: peak memory relative to B)")
    if torch.cuda.is_available():
        n_params = _model_flops_per_token(model_path)
        peak = _matmul_peak_tflops()
        for name, r in rows_out.items():
            precomputed = name == "trl-best" or (
                name.startswith("zephyr") and zephyr_options(name)["precompute_ref_log_probs"]
            )
            reference = 0 if precomputed else 2 * n_params  # a precomputed reference runs no forward per step
            flops = (6 * n_params + reference) * r["tokens_per_s"]
            print(
                f"MFU {name}: {100 * flops / (peak * 1e12):.1f}% of a measured {peak:.0f} TFLOP/s bf16 matmul"
            )


if __name__ == "__main__":
    main()
