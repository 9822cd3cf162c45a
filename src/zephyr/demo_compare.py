"""`zephyr demo --objectives dpo,simpo`: preference objectives side by side, each trained from the same SFT model on
the demo data with the same budget, in one table.

    zephyr demo --objectives dpo,simpo                  # SFT once, then DPO and SimPO from it (the demo's 60 steps)
    zephyr demo --objectives dpo,simpo --max-steps 20   # a smaller budget, the same for every objective
    zephyr demo --objectives dpo,simpo --quick          # 2 steps each and 8 prompts: the pipeline, not the numbers
    zephyr demo --objectives dpo,simpo --sft-model outputs/demo/sft   # start from `zephyr demo`'s SFT model

Every objective starts from recipes/smollm2-demo/dpo.yaml: the data, lengths, steps, batch, learning-rate schedule
and optimizer are shared wherever the stage has the key; DPO's objective keys (beta, loss_type, loss_weights) mean
something else to another objective, which takes its stage's defaults for them plus `OBJECTIVE_OVERRIDES`. The
objectives are the training stages (`zephyr.stages.STAGES`) other than SFT, so a stage registered there can be
compared here at once. Each run is the `zephyr <objective>` command a user would type, in its own process, as in
`zephyr.demo`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import yaml

from zephyr.demo import _recipe, held_out_metrics
from zephyr.engine import Engine
from zephyr.errors import ZephyrError
from zephyr.eval.demo import checkable_prompts, pass_rate
from zephyr.fetch import EMBEDDED_MODEL
from zephyr.recipe import config_keys
from zephyr.stages import STAGES

# Keys of dpo.yaml that set DPO's objective. Another objective's beta or loss_type is another quantity (SimPO's beta
# scales a per-token mean, not a summed log-ratio), so it takes its own stage's default, or the value below.
DPO_OBJECTIVE_KEYS = ("beta", "loss_type", "loss_weights")

OBJECTIVE_OVERRIDES: dict[str, dict] = {
    # The demo recipe's DPO (sigmoid plus the chosen NLL term, RPO) with the reference model run in each step: the
    # cost compared is per step against an in-step reference. A 60-step run already chooses that
    # (zephyr.train.dpo.precompute_choice); written out so that a shorter budget does not change it.
    "dpo": {"precompute_ref_log_probs": False},
    # SimPO's reward is beta times the mean token log-prob (-1.5 to -1.8 at the demo's first step), not DPO's summed
    # log-ratio, so with DPO's beta 0.1 the margins would be a few hundredths. Meng et al. 2024 (SimPO) tune beta in
    # 2.0-2.5 with gamma/beta 0.3-0.8: beta 2.0, simpo_gamma 1.0 (ratio 0.5). No NLL term (cpo_alpha 0), as published.
    "simpo": {"beta": 2.0, "simpo_gamma": 1.0},
    # CPO as published (Xu et al. 2024) and TRL's defaults (beta 0.1 on summed log-probs, NLL weight cpo_alpha 1):
    # the stage's own defaults, nothing to override.
}

REWARD_FOOTNOTE = (
    "reward accuracy: share of the held-out pairs whose chosen reward beats the rejected one (eval rewards/accuracies)."
    " Each objective logs it with its own reward: DPO's is beta times the log-ratio to the reference, CPO's beta times"
    " the summed log-prob, SimPO's beta times the mean token log-prob; the accuracies compare, margins do not."
)


def objectives() -> list[str]:
    """The objectives `--objectives` takes: every training stage but SFT, which they all start from."""
    return [stage for stage in STAGES if stage != "sft"]


def parse_objectives(text: str) -> list[str]:
    """Comma-separated names ("dpo,simpo") as a list, each checked against `objectives()`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    available = objectives()
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        problem = f"no objective named {', '.join(unknown)}" if unknown else "no objective given"
        raise ZephyrError(
            f"--objectives {text!r}: {problem}; "
            f"the objectives are: {', '.join(available)} (comma-separated, e.g. dpo,simpo)"
        )
    if len(set(names)) != len(names):
        raise ZephyrError(f"--objectives {text!r} names an objective twice; name each once")
    return names


def objective_recipe(stage: str) -> tuple[dict, list[str]]:
    """(STAGE's recipe: dpo.yaml's keys that STAGE has, with its OBJECTIVE_OVERRIDES; dpo.yaml keys left out)."""
    base = yaml.safe_load(_recipe("dpo.yaml").read_text(encoding="utf-8"))
    keys = set(config_keys(stage))
    kept = {k: v for k, v in base.items() if k in keys and (stage == "dpo" or k not in DPO_OBJECTIVE_KEYS)}
    return {**kept, **OBJECTIVE_OVERRIDES.get(stage, {})}, [k for k in base if k not in kept]


def run_comparison(
    names: list[str],
    *,
    output_dir: str = "outputs/demo/objectives",
    data_dir: str = "data/demo",
    quick: bool = False,
    max_steps: int | None = None,
    sft_model: str | None = None,
) -> int:
    """Train the SFT model once (or take SFT_MODEL, e.g. the plain demo's outputs/demo/sft), each of NAMES from it,
    and print the table. MAX_STEPS (or 2 with QUICK) replaces the recipe's steps for every objective. The demo data
    in DATA_DIR is used when it is there, and written first when it is not."""
    out, data = Path(output_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = 2 if quick else max_steps
    # `zephyr data demo` is deterministic: data already written there is the same data (the tests write a smaller set).
    if not all((data / part).is_dir() for part in ("ultrachat", "ultrafeedback")):
        _run(["data", "demo", "--output", str(data)])
    if sft_model is not None:
        sft_dir = Path(sft_model)
        if not (sft_dir / "config.json").is_file():
            raise ZephyrError(
                f"--sft-model {sft_model} is not a model folder; give a finished `zephyr sft` run"
            )
    else:
        sft_dir = out / "sft"
        _run(["model", "fetch", EMBEDDED_MODEL])
        quick_sft = ["--max_steps", "2"] if quick else []
        _run(["sft", "--config", str(_recipe("sft.yaml")), "--dataset_name", str(data / "ultrachat"),
              "--output_dir", str(sft_dir), "--overwrite_output_dir", "true", *quick_sft])  # fmt: skip

    rows: dict[str, dict] = {"sft": {}}  # the starting point's pass rate heads the table
    for name in names:
        recipe, left_out = objective_recipe(name)
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        print(f"\n{name}: recipes/smollm2-demo/dpo.yaml without {', '.join(left_out) or 'nothing'}, "
              f"with {OBJECTIVE_OVERRIDES.get(name) or 'no overrides'} -> {path}", flush=True)  # fmt: skip
        # The eval runs once, at the last step, whatever the budget (dpo.yaml evaluates at its 60th).
        budget = ["--max_steps", str(steps), "--eval_steps", str(steps)] if steps else []
        peak = _run(
            [name, "--config", str(path), "--model_name_or_path", str(sft_dir), "--dataset_name",
             str(data / "ultrafeedback"), "--output_dir", str(out / name), "--overwrite_output_dir", "true", *budget]
        )  # fmt: skip
        rows[name] = {
            "reward_accuracy": held_out_metrics(out / name).get("eval_rewards/accuracies"),
            "seconds_per_step": seconds_per_step(out / name / "metrics.jsonl"),
            "peak_rss_bytes": peak,
        }

    print(
        "\nchecking held-out instructions by program (zephyr.data.demo.check), greedy decoding:", flush=True
    )
    prompts = checkable_prompts(data, 8 if quick else 48)
    for name, folder in (("sft", sft_dir), *((name, out / name) for name in names)):
        rows[name]["pass_rate"] = pass_rate(Engine.load(str(folder)), prompts)
    report = {
        "objectives": rows,
        "prompts": len(prompts),
        "max_steps": steps,
        "quick": quick,
        "sft_model": str(sft_dir),
    }
    (out / "comparison.json").write_text(json.dumps(report, indent=1))
    print(f"\n== objectives, each from {sft_dir} ==")
    print(format_table(rows, len(prompts)))
    print(f"results: {out / 'comparison.json'}")
    return 0


def format_table(rows: dict[str, dict], prompts: int) -> str:
    """The comparison as a Markdown table (printed, and pasted into the README as it is)."""
    lines = [
        "| objective | reward accuracy¹ | instruction pass rate² | s / step³ | peak RSS⁴ |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        acc, sps, rss = row.get("reward_accuracy"), row.get("seconds_per_step"), row.get("peak_rss_bytes")
        lines.append(
            f"| {name + ' (start)' if name == 'sft' else name} | {'-' if acc is None else f'{acc:.3f}'} "
            f"| {100 * row['pass_rate']:.1f}% | {'-' if sps is None else f'{sps:.2f}'} "
            f"| {'-' if rss is None else f'{rss / 2**30:.2f} GiB'} |"
        )
    lines += [
        f"¹ {REWARD_FOOTNOTE}",
        f"² share of {prompts} held-out demo instructions whose greedy answer passes its program check (zephyr.eval.demo).",
        "³ mean wall time of a training step, the first (warm-up) step left out, from the run's metrics.jsonl.",
        "⁴ peak resident memory of the training process (os.wait4's ru_maxrss for that child alone).",
    ]
    return "\n".join(lines)


def seconds_per_step(metrics_file: Path) -> float | None:
    """Mean seconds per optimizer step, from the logged windows (each window's tokens / its tokens_per_second). The
    first window is left out: it pays for one-time warm-up (allocations, the first reference load into cache)."""
    if not metrics_file.is_file():
        return None
    records = [
        json.loads(line) for line in metrics_file.read_text().splitlines() if '"tokens_per_second"' in line
    ]
    seconds = steps = 0.0
    for before, record in pairwise(records):
        seconds += (record["num_tokens"] - before["num_tokens"]) / max(record["tokens_per_second"], 1e-9)
        steps += record["step"] - before["step"]
    return seconds / steps if steps else None


def _run(args: list[str]) -> int | None:
    """Run `zephyr ARGS` as zephyr.demo does; its peak RSS in bytes (None where os.wait4 does not exist).

    os.wait4 returns this one child's resource usage. getrusage(RUSAGE_CHILDREN) would not do: its ru_maxrss is the
    largest of every child waited for so far, so after a bigger run (the SFT) a smaller one would read as the bigger."""
    print(f"\n$ zephyr {shlex.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "zephyr", *args])
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    else:
        proc.wait()
        peak = None
    if proc.returncode != 0:
        raise ZephyrError(
            f"`zephyr {shlex.join(args)}` failed with exit status {proc.returncode}; see its message above"
        )
    return peak
