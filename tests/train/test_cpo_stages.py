"""`zephyr simpo` and `zephyr cpo` end to end through the CLI on the tiny model: the model folder, its run record,
card and TRL-named metrics; the other CPO loss types train; TRL's logits/* from hidden states."""

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


def _train(stage: str, model: Path, data: Path, out: Path, *extra: str) -> int:
    return main([
        stage, f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={out}", "--max_steps=2",
        "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4", "--learning_rate=1e-3",
        "--logging_steps=1", "--bf16=false", "--gradient_checkpointing=false", "--max_length=64",
        "--save_strategy=no", "--eval_strategy=steps", "--eval_steps=2", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_simpo_runs_through_the_cli_and_writes_a_model_folder(tmp_path, tiny_model_dir, prefs, capsys):
    out = tmp_path / "simpo"
    assert _train("simpo", tiny_model_dir, prefs, out) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    record = RunRecord.read(out)
    assert (
        record.stage == "simpo" and record.config["loss_type"] == "simpo" and record.config["cpo_alpha"] == 0
    )
    card = (out / "README.md").read_text()
    assert "Simple Preference Optimization (SimPO)" in card
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in steps if "loss" in r]
    assert len(train) == 2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "grad_norm", "learning_rate"):  # fmt: skip
        assert key in train[0], key
    assert train[0]["nll_loss"] == 0.0  # cpo_alpha 0: no NLL term, logged as 0 as TRL does
    # the default packed layout cannot give TRL's logits/*; they are left out rather than logged differently
    assert "logits/chosen" not in train[0]
    assert any("eval_rewards/margins" in r for r in steps)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_loss_types_train_in_trls_layout(tmp_path, tiny_model_dir, prefs, loss_type):
    out = tmp_path / loss_type
    assert (
        _train("cpo", tiny_model_dir, prefs, out, f"--loss_type={loss_type}", "--prefix_sharing=false") == 0
    )
    record = RunRecord.read(out)
    assert record.stage == "cpo" and record.config["loss_type"] == loss_type
    train = [r for r in record.log_history if "loss" in r]
    assert all(r["nll_loss"] > 0 and "logits/chosen" in r for r in train)


def test_a_cpo_key_error_is_one_line_before_any_model_loads(tmp_path, capsys):
    code = main(["simpo", "--loss_type=sigmoid_norm", f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "loss_type = 'sigmoid_norm'" in err and "simpo" in err


@pytest.mark.parametrize("bias", [False, True])
def test_the_mean_logit_probe_is_the_mean_of_the_full_logits(bias):
    """TRL's logits/chosen (rejected): the mean of head(hidden) over the chosen (rejected) rows, every position and
    the whole vocabulary, here from hidden [4, 3, 5] (2 pairs) through a 7-word head."""
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 7, bias=bias)
    probe = MeanLogitProbe(head)
    hidden = torch.randn(4, 3, 5)
    logits = head(hidden)
    chosen, rejected = probe.pop()
    torch.testing.assert_close(chosen, logits[:2].mean().detach())
    torch.testing.assert_close(rejected, logits[2:].mean().detach())
    assert probe.pop() is None
