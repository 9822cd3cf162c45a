"""One AdamW step over a model's worth of parameters: torch's implementations side by side (time and peak memory).

    python benchmarks/optimizer_step.py                  # SmolLM2-135M's shapes (28.3M embedding + 107 x 1M), fp32
    python benchmarks/optimizer_step.py --params 1100    # about 1.1B parameters

Each implementation runs in its own process, so its peak RSS (or CUDA peak) is its own; printed: seconds per step
(median of the steps after the first) and the peak memory above parameters + gradients, which the optimizer's two
state tensors (2 x the parameters) and any temporaries make.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def worker(mode: str, millions: float, steps: int) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    embedding = 28_311_552  # SmolLM2-135M's tied embedding; the rest in 1M-parameter tensors
    sizes = [embedding] + [1_000_000] * max(1, round((millions * 1e6 - embedding) / 1e6))
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)

    def peak() -> float:
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = peak()
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[mode]
    optimizer = torch.optim.AdamW(params, lr=1e-3, **flags)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    n = sum(sizes)
    print(
        "RESULT "
        + json.dumps({"params": n, "step_s": statistics.median(times[1:]), "extra_mb": peak() - base})
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=135, help="millions of parameters")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.params, args.steps)
    print(f"{'AdamW':10s} {'s/step':>8s} {'MB over params+grads':>21s}")
    for mode in ("fused", "foreach", "for-loop"):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", mode, "--params", str(args.params), "--steps", str(args.steps)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
        print(f"{mode:10s} {r['step_s']:8.3f} {r['extra_mb']:21.0f}")
    print(f"({r['params'] / 1e6:.0f}M parameters)")


if __name__ == "__main__":
    main()
