"""`zephyr demo`: the whole Zephyr pipeline on the embedded SmolLM2-135M-Instruct and the bundled data, on a CPU.

    zephyr demo              # fetch model -> demo data -> inspect -> SFT -> DPO -> checkable win rates + plot

Each stage runs the same command a user would type (printed before it runs), in its own process, so the demo is
also a worked example of the CLI. The bundled preference data is checkable by program (`zephyr.data.demo.check`),
so the last stage measures how often each model follows the held-out instructions without an LLM judge.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from zephyr.engine import Engine
from zephyr.errors import ZephyrError
from zephyr.eval.demo import checkable_prompts, pass_rate
from zephyr.fetch import EMBEDDED_MODEL

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-demo"


def _recipe(name: str) -> Path:
    """The demo recipe, from the source tree (editable install) or next to the package."""
    path = RECIPES / name
    if not path.is_file():
        raise ZephyrError(
            f"the demo recipe {path} is missing; run `zephyr demo` from a checkout of the repository"
        )
    return path


def _run(args: list[str]) -> None:
    print(f"\n$ zephyr {shlex.join(args)}", flush=True)
    code = subprocess.call([sys.executable, "-m", "zephyr", *args])
    if code != 0:
        raise ZephyrError(
            f"`zephyr {shlex.join(args)}` failed with exit status {code}; see its message above"
        )


def run_demo(*, output_dir: str = "outputs/demo", data_dir: str = "data/demo", quick: bool = False) -> int:

    start = time.perf_counter()
    out, data = Path(output_dir), Path(data_dir)
    sft_dir, dpo_dir = out / "sft", out / "dpo"
    steps = ["--max_steps", "2"] if quick else []

    _run(["model", "fetch", EMBEDDED_MODEL])
    _run(["data", "demo", "--output", str(data)])
    # The DPO recipe's model is the SFT output, which does not exist yet: measure with the embedded tokenizer.
    _run(
        [
            "data",
            "inspect",
            str(data / "ultrafeedback"),
            "--recipe",
            str(_recipe("dpo.yaml")),
            "--model",
            EMBEDDED_MODEL,
        ]
    )
    _run(
        [
            "sft",
            "--config",
            str(_recipe("sft.yaml")),
            "--dataset_name",
            str(data / "ultrachat"),
            "--output_dir",
            str(sft_dir),
            "--overwrite_output_dir",  # each demo trains afresh, replacing the last demo's models
            "true",
            *steps,
        ]
    )
    _run(
        [
            "dpo",
            "--config",
            str(_recipe("dpo.yaml")),
            "--dataset_name",
            str(data / "ultrafeedback"),
            "--model_name_or_path",
            str(sft_dir),
            "--output_dir",
            str(dpo_dir),
            "--overwrite_output_dir",
            "true",
            *steps,
        ]
    )

    print(
        "\nchecking held-out instructions by program (zephyr.data.demo.check), greedy decoding:", flush=True
    )
    prompts = checkable_prompts(data, 8 if quick else 48)
    rates = {}
    for name, model in (("base", EMBEDDED_MODEL), ("sft", str(sft_dir)), ("dpo", str(dpo_dir))):
        rates[name] = pass_rate(Engine.load(model), prompts)
        print(
            f"  {name:5s} {model:40s} follows {100 * rates[name]:5.1f}% of {len(prompts)} instructions",
            flush=True,
        )

    final_eval = held_out_metrics(dpo_dir)
    report = {
        "instruction_pass_rate": rates,
        "prompts": len(prompts),
        "held_out_after_dpo": final_eval,
        "seconds": round(time.perf_counter() - start),
    }
    (out / "demo_results.json").write_text(json.dumps(report, indent=1))
    print("\n== Zephyr demo report ==")
    print("held-out preference pairs (DPO eval split):")
    print(
        "  before DPO: reward accuracy 0.00, margin 0.000 (the policy is its own reference, so every reward is 0)"
    )
    if final_eval:
        print(
            f"  after DPO:  reward accuracy {final_eval['eval_rewards/accuracies']:.3f}, "
            f"margin {final_eval['eval_rewards/margins']:.3f}, loss {final_eval['eval_loss']:.4f}"
        )
    print("instructions followed (checked by program), greedy answers to held-out prompts:")
    print("  " + ", ".join(f"{name} {100 * rate:.1f}%" for name, rate in rates.items()))
    print(f"model: {dpo_dir}  (transformers.pipeline('text-generation', model='{dpo_dir}') loads it)")
    print(
        f"results table: {dpo_dir / 'results.md'}; plots: {sft_dir / 'training.png'}, {dpo_dir / 'training.png'}"
    )
    print(
        f"chat with it: zephyr chat --model {dpo_dir}   (or a web page and an OpenAI-compatible API: zephyr serve --model {dpo_dir})"
    )
    print(
        f"or from Python: python -c \"from transformers import pipeline; p = pipeline('text-generation', "
        f"model='{dpo_dir}'); print(p([{{'role': 'user', 'content': 'What is 12 + 30?'}}])[0]['generated_text'])\""
    )
    print(f"demo finished in {report['seconds']}s")
    return 0


def held_out_metrics(run_dir: Path) -> dict:
    """The last evaluation of a run, from its metrics.jsonl ({} when it had none)."""
    file = run_dir / "metrics.jsonl"
    evals = (
        [json.loads(line) for line in file.read_text().splitlines() if '"eval_loss"' in line]
        if file.is_file()
        else []
    )
    return evals[-1] if evals else {}
