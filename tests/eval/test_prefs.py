"""`zephyr eval prefs` agrees with the DPO loop's own last eval on the same model, reference, data and settings,
finds the reference the run recorded, and refuses what it cannot score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zephyr.errors import ZephyrError
from zephyr.eval.prefs import METRIC_KEYS, eval_prefs, recorded_reference


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pair(i: int) -> dict:
    return {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"It is {2 * i + 1}, or so."}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from zephyr.recipe import load_config
    from zephyr.train.dpo import run_dpo

    tmp = tmp_path_factory.mktemp("eval-prefs")
    _jsonl(tmp / "prefs" / "train.jsonl", [_pair(i) for i in range(8)])
    _jsonl(tmp / "prefs" / "test.jsonl", [_pair(i) for i in range(100, 106)])
    out = tmp / "dpo"
    cfg = load_config("dpo", None, [
        f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={tmp / 'prefs'}", f"--output_dir={out}",
        "--max_steps=2", "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4",
        "--learning_rate=1e-2", "--logging_steps=1", "--eval_strategy=steps", "--eval_steps=2", "--bf16=false",
        "--max_length=48", "--save_strategy=no", "--chat_template=zephyr", "--beta=0.05",
        "--auto_insert_empty_system_msg=false",
    ])  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(tmp / "cache"))
        run_dpo(cfg, progress=False)
        yield tmp, out, mp


def test_matches_the_runs_last_eval(run, tiny_model_dir):
    tmp, out, mp = run
    mp.setenv("ZEPHYR_CACHE", str(tmp / "cache"))
    last_eval = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line
    ][-1]
    result = eval_prefs(
        str(out), data=str(tmp / "prefs"), split="test", beta=0.05, max_length=48, batch_size=4,
        output=str(tmp / "prefs.json"), progress=False,
    )  # fmt: skip
    assert result["pairs"] == 6
    assert last_eval["eval_rewards/margins"] != 0  # trained: the comparison is not between two zeros
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(last_eval[f"eval_{key}"], rel=1e-5, abs=1e-6), key
    written = json.loads((tmp / "prefs.json").read_text())
    assert written["ref_model"] == str(tiny_model_dir) and written["loss"] == result["loss"]
    assert not any(k.startswith("eval_") for k in written)


def test_reference_itself_scores_zero_rewards(run, tiny_model_dir):
    tmp, _, mp = run
    mp.setenv("ZEPHYR_CACHE", str(tmp / "cache"))
    result = eval_prefs(
        str(tiny_model_dir), ref_model=str(tiny_model_dir), data=str(tmp / "prefs"), split="test",
        max_length=48, progress=False,
    )  # fmt: skip
    assert result["rewards/chosen"] == 0 and result["rewards/margins"] == 0
    assert result["loss"] == pytest.approx(0.6931472, abs=1e-6)  # -log sigmoid(0)


def test_reference_comes_from_the_run_record(run, tiny_model_dir, tmp_path):
    _, out, _ = run
    assert recorded_reference(str(out)) == str(tiny_model_dir)
    with pytest.raises(ZephyrError, match="pass --ref-model"):
        recorded_reference(str(tmp_path))
    (tmp_path / "zephyr_run.json").write_text("{not json")
    with pytest.raises(ZephyrError, match="not valid JSON"):
        recorded_reference(str(tmp_path))


def test_a_missing_split_is_named(run):
    tmp, out, mp = run
    mp.setenv("ZEPHYR_CACHE", str(tmp / "cache"))
    with pytest.raises(ZephyrError, match="test_prefs"):
        eval_prefs(str(out), data=str(tmp / "prefs"), split="test_prefs", progress=False)


def test_the_runs_own_settings_are_the_defaults(run):
    """Without --beta / --max-length the run's recorded ones apply (beta 0.05, max_length 48, the zephyr template,
    no empty system message), so the numbers are again the run's last eval."""
    tmp, out, mp = run
    mp.setenv("ZEPHYR_CACHE", str(tmp / "cache"))
    last_eval = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line
    ][-1]
    result = eval_prefs(str(out), data=str(tmp / "prefs"), split="test", batch_size=4, progress=False)
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(last_eval[f"eval_{key}"], rel=1e-5, abs=1e-6), key
    other = eval_prefs(
        str(out), data=str(tmp / "prefs"), split="test", beta=0.5, batch_size=4, progress=False
    )
    assert other["rewards/margins"] == pytest.approx(
        10 * result["rewards/margins"], rel=1e-4
    )  # beta 0.5 vs 0.05
