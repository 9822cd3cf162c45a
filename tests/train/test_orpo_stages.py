"""`zephyr orpo` end to end through the CLI on the tiny model: the model folder, its run record, card and TRL-named
metrics; the layout ORPO needs; TRL's ORPO logits/* from hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zephyr.cli import main
from zephyr.run_record import RunRecord
from zephyr.train.cpo import MeanLogitProbe


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zephyr-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prefs")
    for split, numbers in (("train", range(8)), ("test", range(100, 104))):
        rows = [
            {
                "prompt": f"What is {i} + {i}?",
                "chosen": f"{2 * i}.",
                "rejected": f"I think it is {2 * i + 1}, or so.",
            }
            for i in numbers
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow
def test_orpo_runs_through_the_cli_and_writes_a_model_folder_with_its_card(
    tmp_path, tiny_model_dir, prefs, capsys
):
    out = tmp_path / "orpo"
    code = main([
        "orpo", f"--model_name_or_path={tiny_model_dir}", f"--dataset_name={prefs}", f"--output_dir={out}",
        "--max_steps=2", "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4", "--learning_rate=1e-3",
        "--logging_steps=1", "--bf16=false", "--gradient_checkpointing=false", "--max_length=64", "--beta=0.2",
        "--save_strategy=no", "--eval_strategy=steps", "--eval_steps=2",
    ])  # fmt: skip
    assert code == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    record = RunRecord.read(out)
    assert record.stage == "orpo" and record.config["beta"] == 0.2
    card = (out / "README.md").read_text()
    assert "Odds Ratio Preference Optimization (ORPO)" in card
    assert "beta: 0.2" in card and "reference_model: none (reference-free)" in card
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in steps if "loss" in r]
    assert len(train) == 2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio",
                "log_odds_chosen", "grad_norm", "learning_rate"):  # fmt: skip
        assert key in train[0], key
    # logps/* are mean log-probs (the odds' P), so each is a log-probability; the loss exceeds the NLL by β L_OR > 0
    assert all(r["logps/chosen"] < 0 and r["loss"] > r["nll_loss"] > 0 for r in train)
    assert any("eval_log_odds_ratio" in r for r in steps)


def test_orpo_refuses_padding_free_in_one_line(tmp_path, capsys):
    code = main(["orpo", "--padding_free=true", f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "padding_free = True" in err and "ORPO" in err


def test_the_mean_logit_probe_can_leave_out_the_last_position():
    """TRL's ORPO logits/chosen (rejected): the mean of head(hidden)[:, :-1] over the chosen (rejected) rows, here
    from hidden [4, 3, 5] (2 pairs) through a 7-word head."""
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 7)
    probe = MeanLogitProbe(head, drop_last_position=True)
    logits = head(torch.randn(4, 3, 5))
    chosen, rejected = probe.pop()
    torch.testing.assert_close(chosen, logits[:2, :-1].mean().detach())
    torch.testing.assert_close(rejected, logits[2:, :-1].mean().detach())
