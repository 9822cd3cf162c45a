"""`zephyr demo --objectives`: the objectives come from the stages registry, each recipe is dpo.yaml with the same
budget and its own objective keys, the table's numbers are read correctly, and the whole comparison runs end to end
on a tiny model (marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zephyr.cli import main
from zephyr.data.demo import generate
from zephyr.demo_compare import (
    DPO_OBJECTIVE_KEYS,
    objective_recipe,
    objectives,
    parse_objectives,
    seconds_per_step,
)
from zephyr.errors import ZephyrError
from zephyr.recipe import load_config
from zephyr.stages import STAGES

DPO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-demo" / "dpo.yaml"
# The keys that make "the same budget": data, lengths, steps, batch, learning-rate schedule, optimizer, seed.
BUDGET_KEYS = (
    "dataset_name", "max_length", "max_prompt_length", "learning_rate", "lr_scheduler_type", "warmup_ratio",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "seed", "eval_steps",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))


def test_the_objectives_are_the_registered_stages_but_sft():
    assert objectives() == [stage for stage in STAGES if stage != "sft"]
    assert {"dpo", "simpo"} <= set(objectives())


def test_an_unknown_objective_is_refused_naming_the_available_ones(capsys):
    with pytest.raises(ZephyrError) as info:
        parse_objectives("dpo,simp")
    assert "no objective named simp" in str(info.value)
    assert all(name in str(info.value) for name in objectives())
    with pytest.raises(ZephyrError, match="sft"):
        parse_objectives("sft,dpo")  # the starting point, not an objective
    assert parse_objectives(" dpo , simpo ") == ["dpo", "simpo"]
    assert main(["demo", "--objectives", "dpo,nope"]) == 2  # one `error:` line, before anything runs
    assert capsys.readouterr().err.startswith("error: --objectives 'dpo,nope': no objective named nope")


@pytest.mark.parametrize("stage", ["dpo", "simpo", "cpo"])
def test_each_objective_recipe_keeps_the_budget_and_loads(stage, tmp_path):
    recipe, _ = objective_recipe(stage)
    base = yaml.safe_load(DPO_RECIPE.read_text())
    assert {key: recipe[key] for key in BUDGET_KEYS} == {key: base[key] for key in BUDGET_KEYS}
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    load_config(stage, path)  # a valid recipe of its own stage


def test_another_objective_takes_its_own_objective_keys():
    simpo, left_out = objective_recipe("simpo")
    assert set(DPO_OBJECTIVE_KEYS) <= set(left_out) and "precompute_ref_log_probs" not in simpo
    assert (simpo["beta"], simpo["simpo_gamma"]) == (2.0, 1.0)
    dpo, _ = objective_recipe("dpo")
    assert (dpo["loss_type"], dpo["precompute_ref_log_probs"]) == (["sigmoid", "sft"], False)


def test_seconds_per_step_leaves_out_the_first_window(tmp_path):
    """Windows of 100 tokens at 10 tok/s (10 s: the warm-up, left out), then 200 at 100 (2 s), 300 at 100 (3 s):
    5 s over steps 2 and 3, 2.5 s a step."""
    file = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "num_tokens": 100, "tokens_per_second": 10.0},
        {"step": 2, "num_tokens": 300, "tokens_per_second": 100.0},
        {"step": 2, "eval_loss": 1.0},
        {"step": 3, "num_tokens": 600, "tokens_per_second": 100.0},
    ]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert seconds_per_step(file) == pytest.approx(2.5)
    assert seconds_per_step(tmp_path / "missing.jsonl") is None


@pytest.mark.slow
def test_dpo_and_simpo_are_compared_end_to_end(tiny_model_dir, tmp_path, capsys):
    """The tiny model stands in for the SFT model; a few demo rows stand in for the data (2 steps each)."""
    data = tmp_path / "data"
    generate(data, n_sft_train=24, n_sft_test=6, n_pref_train=24, n_pref_test=24)
    argv = ["demo", "--objectives", "dpo,simpo", "--quick", "--sft-model", str(tiny_model_dir),
            "--output-dir", str(tmp_path / "out"), "--data-dir", str(data)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out.split("== objectives")[1]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == [
        "sft (start)", "dpo", "simpo",
    ]  # fmt: skip
    report = json.loads((tmp_path / "out" / "objectives" / "comparison.json").read_text())["objectives"]
    for name in ("dpo", "simpo"):
        row = report[name]
        assert 0 <= row["reward_accuracy"] <= 1 and 0 <= row["pass_rate"] <= 1
        assert row["seconds_per_step"] > 0 and row["peak_rss_bytes"] > 50 * 2**20  # torch alone is more
