"""Writes that fail and caches that go bad, and what each costs a run.

- A checkpoint write that fails (a full disk, a file-size limit, from any of the writers accelerate uses) stops the
  run with a `ZephyrError` naming the checkpoint, the reason and the previous checkpoint; that checkpoint's files
  are untouched, nothing appears under the new checkpoint's name, the temporary folder is removed, and the run
  resumes from the previous checkpoint to the uninterrupted run's metrics.
- Old checkpoints are renamed before they are deleted, so a run killed mid-deletion leaves nothing that looks
  complete; the next run clears what is left.
- Reference log-probs: the cache key follows the weights (rewritten within the same second, same size), the
  truncation mode and the chat template; a cache file cut short, foreign, or of another length is computed again
  with a message; a run killed between writing and renaming it leaves nothing that is read.
- Tokenized data: a cache cut short, or whose row count does not match, is rebuilt with a message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zephyr.data.tokenize as tokenize_module
import zephyr.train.checkpoint as checkpoint_module
from zephyr.errors import ZephyrError
from zephyr.train.checkpoint import (
    TrainerState,
    fault_point,
    list_checkpoints,
    remove_partial_checkpoints,
    resume_candidates,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test's own cache (tokenized data, reference log-probs), and no fault unless it asks for one."""
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZEPHYR_FAULT", raising=False)
    return tmp_path / "cache"


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------- save_checkpoint


class OneProcess:
    """The part of `accelerate.Accelerator` that `save_checkpoint` uses, for one process. Its state is written with
    the writers accelerate uses: safetensors for the model, torch.save for the optimizer."""

    is_main_process = True

    def __init__(self, model_numel: int = 1024, optimizer_numel: int = 1024):
        self.model_numel, self.optimizer_numel = model_numel, optimizer_numel

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str, safe_serialization: bool = True) -> None:
        Path(folder).mkdir(parents=True)
        save_file({"weight": torch.randn(self.model_numel)}, f"{folder}/model.safetensors")
        torch.save({"exp_avg": torch.randn(self.optimizer_numel)}, f"{folder}/optimizer.bin")


def save(accelerator, out: Path, step: int, *, limit: int | None = None, log_records: int = 0) -> Path:
    state = TrainerState(global_step=step, max_steps=6, log_history=[{"step": i} for i in range(log_records)])
    return save_checkpoint(accelerator, state, out, limit)


def assert_only_the_first_checkpoint_is_left(out: Path, first: Path, before: dict[str, str]) -> None:
    assert sorted(p.name for p in out.iterdir()) == [first.name]  # no checkpoint-4, no temporary folder
    assert digests(first) == before
    assert resume_candidates(out, True) == [first]


def test_fault_point_raises_the_named_os_error_at_its_point_only(monkeypatch):
    monkeypatch.setenv("ZEPHYR_FAULT", "checkpoint-write:4/ENOSPC")
    fault_point("checkpoint-write:2")
    fault_point("checkpoint:4")
    with pytest.raises(OSError) as err:
        fault_point("checkpoint-write:4")
    assert err.value.errno == errno.ENOSPC and err.value.strerror == "No space left on device"


def test_a_full_disk_at_the_second_checkpoint_keeps_the_first_and_says_where(tmp_path, monkeypatch):
    out = tmp_path / "run"
    accelerator = OneProcess()
    first = save(accelerator, out, 2)
    before = digests(first)
    monkeypatch.setenv("ZEPHYR_FAULT", "checkpoint-write:4/ENOSPC")  # model and optimizer written, then full
    with pytest.raises(ZephyrError) as err:
        save(accelerator, out, 4)
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {out / 'checkpoint-4'}: No space left on device (")
    assert "MiB free on that disk)" in message
    assert f"; the previous checkpoint {first} is intact." in message
    assert message.endswith("run again with --resume_from_checkpoint true")
    assert_only_the_first_checkpoint_is_left(out, first, before)


def test_a_failure_at_the_first_checkpoint_says_there_is_none_before(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_FAULT", "checkpoint:2/EACCES")
    with pytest.raises(
        ZephyrError, match=r"checkpoint-2: Permission denied \(.*\); no earlier checkpoint exists"
    ):
        save(OneProcess(), tmp_path, 2)
    assert list(tmp_path.iterdir()) == []


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past NBYTES of any file fail with EFBIG ("File too large"), a real error from the kernel that reaches
    each writer the way a full disk's ENOSPC does; SIGXFSZ, which would kill the process instead, is ignored."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize(
    ("sizes", "log_records", "reason"),
    [
        # safetensors reports the OS error in a SafetensorError
        ({"model_numel": 4096}, 0, "SafetensorError: .*File too large"),
        # torch.save's zip writer hides it in a RuntimeError ("unexpected pos ...")
        ({"optimizer_numel": 4096}, 0, "RuntimeError: .*(inline_container|PytorchStreamWriter)"),
        # our own trainer_state.json: a plain OSError
        ({}, 2000, "File too large"),
    ],
    ids=["model-safetensors", "optimizer-torch-save", "trainer-state-json"],
)
def test_a_real_write_error_from_any_writer_keeps_the_previous_checkpoint(
    tmp_path, sizes, log_records, reason
):
    out = tmp_path / "run"
    first = save(OneProcess(), out, 2, log_records=log_records)
    before = digests(first)
    with file_size_limit(8192), pytest.raises(ZephyrError) as err:
        save(OneProcess(**sizes), out, 4, log_records=log_records)
    assert str(err.value).startswith(f"could not write checkpoint {out / 'checkpoint-4'}: ")
    assert re.search(reason, str(err.value)), str(err.value)
    assert f"the previous checkpoint {first} is intact" in str(err.value)
    assert_only_the_first_checkpoint_is_left(out, first, before)


class FailsOtherwise(OneProcess):
    def save_state(self, folder: str, safe_serialization: bool = True) -> None:
        super().save_state(folder, safe_serialization)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_an_error_that_is_not_a_write_keeps_its_own_type_and_traceback(tmp_path):
    """Only write failures become the one-line checkpoint message; a device error is not the disk's fault."""
    with pytest.raises(RuntimeError, match="illegal memory access"):
        save(FailsOtherwise(), tmp_path, 2)
    assert list(tmp_path.iterdir()) == []  # its temporary folder removed all the same


def test_old_checkpoints_are_renamed_out_of_sight_before_they_are_deleted(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for step in (2, 4, 6):
        save(OneProcess(), out, step, limit=2)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]

    # A run killed while deleting checkpoint-4 (here: a deletion that never happens) leaves a folder that is not
    # taken for a checkpoint, and the next run's clean-up removes it.
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint_module, "shutil", SimpleNamespace(rmtree=lambda path, **kwargs: None))
        save(OneProcess(), out, 8, limit=2)
    assert (out / ".checkpoint-4.deleting" / "trainer_state.json").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
    assert resume_candidates(out, True) == [out / "checkpoint-8", out / "checkpoint-6"]
    (out / ".checkpoint-10.tmp").mkdir()  # and one killed while writing
    remove_partial_checkpoints(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "checkpoint-8"]


# ---------------------------------------------------------------------------------------------- a whole run


def _pair(i: int) -> dict:
    return {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"I think it is {2 * i + 1}."}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prefs")
    (folder / "train.jsonl").write_text("".join(json.dumps(_pair(i)) + "\n" for i in range(16)))
    return folder


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--model_name_or_path={model}", f"--dataset_name={data}", f"--output_dir={out}", "--max_steps=6",
            "--per_device_train_batch_size=2", "--learning_rate=1e-3", "--save_steps=2", "--logging_steps=1",
            "--bf16=false", "--seed=3", "--gradient_checkpointing=false", "--max_length=64", *extra]  # fmt: skip


def _run(model: Path, data: Path, out: Path, *extra: str):
    from zephyr.recipe import load_config
    from zephyr.train.dpo import run_dpo

    return run_dpo(load_config("dpo", None, _args(model, data, out, *extra)), progress=False)


def _steps(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_the_cli_with_one_line_and_the_rerun_resumes(
    tmp_path, tiny_model_dir, prefs, monkeypatch, capsys
):
    import zephyr.train.loop
    from zephyr.cli import main

    _run(tiny_model_dir, prefs, tmp_path / "uninterrupted")
    expected = _steps(tmp_path / "uninterrupted")

    written: dict[Path, dict[str, str]] = {}  # each checkpoint's files as the loop left them

    def recording(*args, **kwargs):
        path = save_checkpoint(*args, **kwargs)
        written[path] = digests(path)
        return path

    monkeypatch.setattr(zephyr.train.loop, "save_checkpoint", recording)
    out = tmp_path / "run"
    monkeypatch.setenv("ZEPHYR_FAULT", "checkpoint-write:4/ENOSPC")
    capsys.readouterr()
    assert main(["dpo", *_args(tiny_model_dir, prefs, out)]) == 2
    stderr = capsys.readouterr().err
    assert f"error: could not write checkpoint {out / 'checkpoint-4'}: No space left on device" in stderr
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in stderr
    assert "Traceback" not in stderr
    assert list(written) == [out / "checkpoint-2"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "model.safetensors").exists()
    assert digests(out / "checkpoint-2") == written[out / "checkpoint-2"]

    monkeypatch.delenv("ZEPHYR_FAULT")
    _run(tiny_model_dir, prefs, out, "--resume_from_checkpoint=true")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    got = _steps(out)
    assert sorted(got) == list(range(1, 7))
    for step, record in expected.items():
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins", "logps/chosen"):
            assert got[step][key] == pytest.approx(record[key], rel=1e-5, abs=1e-8), (step, key)


def test_a_full_disk_at_the_final_save_names_the_checkpoint_to_resume_from(
    tmp_path, tiny_model_dir, prefs, monkeypatch, capsys
):
    from zephyr.cli import main

    out = tmp_path / "run"
    monkeypatch.setenv("ZEPHYR_FAULT", "final-save/ENOSPC")
    assert (
        main(
            ["dpo", *[a for a in _args(tiny_model_dir, prefs, out) if a != "--max_steps=6"], "--max_steps=4"]
        )
        == 2
    )
    stderr = capsys.readouterr().err
    assert f"error: could not write the final model to {out}: No space left on device" in stderr
    assert f"the last checkpoint {out / 'checkpoint-2'} is intact" in stderr and "Traceback" not in stderr
    assert not (out / ".final.tmp").exists() and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- reference cache


class Killed(BaseException):
    """Stands for SIGKILL at a fault point: nothing after it runs (no `except Exception` catches it)."""


@pytest.fixture
def reference(tmp_path, tiny_model_dir, prefs, monkeypatch):
    """(compute, passes): compute() runs `precompute_reference` on the 16 train pairs and returns the two columns;
    `passes` records each `fault_point` the pass reaches ("precompute" once per batch, then "reference-cache")."""
    import zephyr.train.dpo
    from zephyr.data.prepare import load_recipe_tokenizer, prepare
    from zephyr.models import load_model
    from zephyr.recipe import load_config
    from zephyr.train.collate import PreferenceCollator
    from zephyr.train.dpo import precompute_reference
    from zephyr.train.fused_head import attach_completion_head
    from zephyr.train.setup import make_accelerator

    cfg = load_config("dpo", None, _args(tiny_model_dir, prefs, tmp_path / "out"))
    accelerator = make_accelerator(cfg)
    tokenizer = load_recipe_tokenizer(cfg)
    train = prepare(cfg, stage="dpo", tokenizer=tokenizer).train
    model = load_model(str(tiny_model_dir), dtype="float32").eval()
    attach_completion_head(model)
    collate = PreferenceCollator(
        pad_token_id=tokenizer.pad_token_id, max_length=64, truncation_mode="keep_end"
    )
    passes: list[str] = []
    monkeypatch.setattr(zephyr.train.dpo, "fault_point", passes.append)

    def compute() -> dict[str, list[float]]:
        ds = precompute_reference(
            cfg, accelerator, model, train, collate, ref_name=str(tiny_model_dir), precision="no"
        )
        return {c: ds[c] for c in ("ref_chosen_logps", "ref_rejected_logps")}

    return compute, passes


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        _cut_in_half,
        lambda path: path.write_bytes(b"not a torch file"),
        lambda path: torch.save({"chosen": torch.zeros(3), "rejected": torch.zeros(3)}, path),
        lambda path: torch.save({"chosen": torch.zeros(16)}, path),
    ],
    ids=["cut-in-half", "garbage", "other-row-count", "a-side-missing"],
)
def test_a_damaged_reference_cache_is_computed_again_with_a_message(reference, cache, capsys, damage):
    compute, passes = reference
    first = compute()
    (path,) = (cache / "ref_logps").glob("*.pt")
    assert passes.count("precompute") > 0 and passes[-1] == "reference-cache"
    damage(path)
    passes.clear()
    capsys.readouterr()
    again = compute()
    printed = capsys.readouterr().out
    assert f"reference log-probs: {path} is unreadable (" in printed and "computing them again" in printed
    assert "reusing" not in printed and passes.count("precompute") > 0
    assert again == first
    passes.clear()
    assert compute() == first and not passes  # repaired: the third call reuses it
    assert "reusing" in capsys.readouterr().out


def test_a_run_killed_before_renaming_the_reference_cache_leaves_nothing_that_is_read(
    reference, cache, monkeypatch, capsys
):
    import zephyr.train.dpo

    compute, passes = reference

    def kill_at_rename(point: str) -> None:
        passes.append(point)
        if point == "reference-cache":
            raise Killed

    monkeypatch.setattr(zephyr.train.dpo, "fault_point", kill_at_rename)
    with pytest.raises(Killed):
        compute()
    assert not list((cache / "ref_logps").glob("*.pt"))
    (partial,) = (cache / "ref_logps").iterdir()  # the whole file, under a temporary name
    assert ".tmp" in partial.name and torch.load(partial, weights_only=True)["chosen"].shape == (16,)

    monkeypatch.setattr(zephyr.train.dpo, "fault_point", passes.append)
    passes.clear()
    compute()
    assert passes.count("precompute") > 0 and "reusing" not in capsys.readouterr().out
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 1


def test_the_reference_cache_key_follows_weights_truncation_mode_and_chat_template(
    tmp_path, tiny_model_dir, prefs
):
    from zephyr.data.prepare import prepare
    from zephyr.recipe import load_config
    from zephyr.train.dpo import reference_cache_path

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))

    def key(*extra: str) -> Path:
        cfg = load_config("dpo", None, _args(model, prefs, tmp_path / "out", *extra))
        return reference_cache_path(cfg, str(model), prepare(cfg, stage="dpo").train, "no")

    weights = model / "model.safetensors"
    second = weights.stat().st_mtime_ns // 10**9 * 10**9  # a whole second, in ns
    os.utime(weights, ns=(second, second + 100_000_000))
    base = key()
    assert key() == base
    assert key("--truncation_mode=keep_end") != base  # keep_start is the default
    assert key("--chat_template=zephyr") != base

    # New weights of the same shapes written 0.5 s later, within the same second: the same size, another key.
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = {name: t + 0.01 for name, t in load_file(weights).items()}
    size = weights.stat().st_size
    save_file(tensors, weights, metadata=metadata)
    os.utime(weights, ns=(second, second + 600_000_000))
    assert weights.stat().st_size == size and weights.stat().st_mtime_ns // 10**9 == second // 10**9
    assert key() != base


# ---------------------------------------------------------------------------------------------- tokenized data


def _tokenize(cache_dir: Path) -> datasets.Dataset:
    from tiny import tiny_tokenizer
    from zephyr.data.rejects import Rejects
    from zephyr.data.tokenize import tokenize_preferences

    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
         "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
         "rejected": [{"role": "assistant", "content": "No idea."}]}
        for i in range(6)
    ]  # fmt: skip
    return tokenize_preferences(
        datasets.Dataset.from_list(rows),
        tiny_tokenizer(),
        max_length=None,
        max_prompt_length=None,
        rejects=Rejects(),
        cache_dir=cache_dir,
    )


def _more_rows_written(entry: Path) -> None:
    info = entry / "cache_info.json"
    info.write_text(json.dumps({"rows": json.loads(info.read_text())["rows"] + 1}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: _cut_in_half(next(entry.glob("*.arrow"))),
        lambda entry: next(entry.glob("*.arrow")).write_bytes(b""),
        _more_rows_written,  # as a data file cut at a record-batch boundary reads: it opens, with rows short
        lambda entry: (entry / "cache_info.json").unlink(),  # a cache written before the count was
        lambda entry: _cut_in_half(entry / "refused.json"),
    ],
    ids=["data-cut-in-half", "data-empty", "rows-missing", "no-row-count", "refused-cut"],
)
def test_a_damaged_tokenization_cache_is_rebuilt_with_a_message(tmp_path, monkeypatch, capsys, damage):
    first = _tokenize(tmp_path).to_list()
    (entry,) = tmp_path.iterdir()
    damage(entry)
    calls = []
    original = tokenize_module._tokenize_preference_row

    def counting(row, tokenizer, settings):
        calls.append(1)
        return original(row, tokenizer, settings)

    monkeypatch.setattr(tokenize_module, "_tokenize_preference_row", counting)
    capsys.readouterr()
    assert _tokenize(tmp_path).to_list() == first
    printed = capsys.readouterr().out
    assert f"tokenization cache {entry} is unreadable (" in printed and "tokenizing again" in printed
    assert len(calls) == 6
    calls.clear()
    assert _tokenize(tmp_path).to_list() == first and not calls  # rebuilt whole: read without tokenizing
