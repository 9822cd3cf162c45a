"""Peak memory and time of completion log-probs (forward + backward) at SmolLM2-135M sizes, on the CPU.

    .venv/bin/python benchmarks/logprobs_memory.py            # the table quoted in the docs
    .venv/bin/python benchmarks/logprobs_memory.py --vocab 32000 --d-model 4096 --seq 1024   # Mistral-7B's head

Each variant runs in its own process, so peak RSS (the kernel's high-water mark, `ru_maxrss`) is not polluted by
the others; "extra peak" is that mark minus the RSS after the inputs were built (it includes the weight gradient,
which a training step keeps anyway). "CPU time" (all threads) is steadier than wall time on a shared machine.
Variants:

- plain:      the LM head on every position, a float32 log-softmax over [batch, seq, vocab], gather (the oracle);
- chunked:    `completion_logps` (prompt/padding dropped first, custom autograd Function recomputing each chunk);
- checkpoint: prompt/padding dropped first, then `torch.utils.checkpoint` around each chunk's head + log-softmax.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zephyr.train.logprobs import completion_logps, reference_completion_logps

VARIANTS = {
    "plain": {},
    "chunked-256": {"chunk_size": 256},
    "chunked-1024": {"chunk_size": 1024},
    "chunked-1024+metrics": {"chunk_size": 1024, "with_metrics": True},
    "checkpoint-1024": {"chunk_size": 1024},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _checkpointed_logps(hidden, weight, labels, chunk_size):
    """Per-chunk torch.utils.checkpoint: autograd's own log-softmax backward, recomputed one chunk at a time."""

    def chunk_logps(h, w, t):
        return F.linear(h, w).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)

    targets = labels[:, 1:]
    mask = targets != -100
    h, t = hidden[:, :-1][mask], targets[mask]
    parts = [
        checkpoint(chunk_logps, h[i : i + chunk_size], weight, t[i : i + chunk_size], use_reentrant=False)
        for i in range(0, h.shape[0], chunk_size)
    ]
    return hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, torch.cat(parts)).sum(1)


def run_variant(name: str, args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hidden = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model) * args.d_model**-0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, : args.prompt] = -100
    options = VARIANTS[name]

    def step():
        if name == "plain":
            logps = reference_completion_logps(F.linear(hidden, weight), labels, with_metrics=False).logps
        elif name.startswith("checkpoint"):
            logps = _checkpointed_logps(hidden, weight, labels, options["chunk_size"])
        else:
            logps = completion_logps(
                hidden,
                weight,
                labels,
                chunk_size=options["chunk_size"],
                with_metrics=options.get("with_metrics", False),
            ).logps
        logps.sum().backward()
        hidden.grad = weight.grad = None

    # The first step allocates the gradient buffers a training step would keep anyway; it is not timed.
    baseline = _rss_mb()
    step()
    wall, cpu = [], []
    for _ in range(args.repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {
        "variant": name,
        "extra_peak_mb": _peak_rss_mb() - baseline,
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument(
        "--prompt", type=int, default=256, help="leading tokens of each sequence labelled -100"
    )
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return

    completion = args.batch * (args.seq - 1 - args.prompt)
    print(
        f"batch {args.batch} x seq {args.seq} ({completion} completion tokens), vocab {args.vocab}, "
        f"d_model {args.d_model}, float32, {args.threads} threads, median of {args.repeats} fwd+bwd"
    )
    print(f"{'variant':<22} {'extra peak RSS':>15} {'wall':>8} {'CPU time':>9}")
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"{name:<22} {result['extra_peak_mb']:>12.0f} MB {result['wall_s']:>7.2f}s {result['cpu_s']:>8.2f}s"
        )


if __name__ == "__main__":
    main()
