"""The `zephyr` command line end to end: help and version for every command, the data converters on the bundled
demo data, and user mistakes, which must exit with status 2 and one `error:` line on stderr, never a traceback.

Most tests call `zephyr.cli.main([...])` in process; three run the installed console script, to prove the entry
point and the exit status a shell sees. `data inspect` and `data prepare` have their own files under tests/data/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from zephyr import __version__
from zephyr.cli import build_parser, main
from zephyr.data.demo import generate

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DPO_RECIPE = RECIPES / "smollm2-demo" / "dpo.yaml"
ZEPHYR = Path(sys.executable).with_name("zephyr")  # the console script installed beside this interpreter


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo layout with few rows: ultrachat/{train,test}_sft.jsonl (24, 6), ultrafeedback/{train,test}_prefs."""
    out = tmp_path_factory.mktemp("demo")
    generate(out, n_sft_train=24, n_sft_test=6, n_pref_train=24, n_pref_test=6)
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, *argv: str) -> str:
    """Run ARGV, expecting a user mistake: status 2 and exactly one `error: ...` line on stderr. Returns it."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------ help, version


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for every command and subcommand, found by walking the parser, so new commands are covered."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def test_the_parser_has_the_foundation_commands():
    paths = {" ".join(p) for p in COMMANDS}
    expected = {"demo", "model fetch", "data demo", "data binarize", "data clean-ultrachat", "data inspect"}
    assert expected | {"data prepare", "keys"} <= paths


@pytest.mark.parametrize("path", [" ".join(p) for p in COMMANDS])
def test_every_command_has_real_help(path, capsys):
    parser = COMMANDS[tuple(path.split())]
    with pytest.raises(SystemExit) as exit_info:
        main([*path.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: zephyr {path}")
    # argparse rewraps the description, also after hyphens: compare without whitespace.
    assert parser.description and "".join(parser.description.split()) in "".join(out.split())


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in {path[0] for path in COMMANDS}:
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, name


def test_no_command_prints_help_and_succeeds(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    assert out.startswith("usage: zephyr") and "data" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"zephyr {__version__}\n"


def test_a_group_without_its_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data"])
    assert exit_info.value.code == 2
    assert "usage: zephyr data" in capsys.readouterr().err


def test_unknown_option_of_a_command_without_recipe_keys_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "demo", "--output", str(tmp_path), "--learning_rate", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --learning_rate 1" in capsys.readouterr().err


def test_keys_lists_each_recipe_key_with_its_default(capsys):
    code, out, _ = run(capsys, "keys", "dpo")
    assert code == 0
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()}
    assert rows["beta"] == "0.1" and rows["loss_type"] == "['sigmoid']"


# ---------------------------------------------------------------------------------------------- the console script


def _script(*argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ZEPHYR), *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_console_script_version_and_success(tmp_path, demo):
    assert ZEPHYR.is_file(), f"no console script at {ZEPHYR}; is the package installed (pip install -e .)?"
    version = _script("--version", cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"zephyr {__version__}\n")

    done = _script(
        "data", "binarize", demo / "ultrafeedback" / "test_prefs.jsonl", "--output", "x.jsonl", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("read 6 rows from ")
    assert len(read_jsonl(tmp_path / "x.jsonl")) == 6


def test_console_script_user_error_exits_2_with_one_line(tmp_path):
    failed = _script("data", "binarize", "missing/raw.jsonl", "--output", "x.jsonl", cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr == "error: missing/raw.jsonl: no such file or folder; check the path\n"
    assert failed.stdout == ""
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------------------------------------ data demo


def test_data_demo_writes_the_layout(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "demo", "--output", tmp_path / "d")
    assert code == 0
    assert f"ultrachat: {tmp_path / 'd' / 'ultrachat'}" in out.splitlines()
    assert f"ultrafeedback: {tmp_path / 'd' / 'ultrafeedback'}" in out.splitlines()
    lines = {
        f"{folder}/{name}": len((tmp_path / "d" / folder / name).read_text(encoding="utf-8").splitlines())
        for folder, names in {
            "ultrachat": ("train_sft.jsonl", "test_sft.jsonl"),
            "ultrafeedback": ("train_prefs.jsonl", "test_prefs.jsonl"),
        }.items()
        for name in names
    }
    assert lines == {
        "ultrachat/train_sft.jsonl": 2000,
        "ultrachat/test_sft.jsonl": 200,
        "ultrafeedback/train_prefs.jsonl": 2000,
        "ultrafeedback/test_prefs.jsonl": 200,
    }
    assert (tmp_path / "d" / "README.md").is_file()


# ---------------------------------------------------------------------------------------------------- data binarize


def _best_response(raw: dict) -> str:
    """The published rule, restated: the completion with the highest overall_score, the first one on ties."""
    best = max(range(len(raw["completions"])), key=lambda i: (raw["completions"][i]["overall_score"], -i))
    return raw["completions"][best]["response"]


def test_binarize_reports_and_writes_pairs_by_the_published_rule(tmp_path, demo, capsys):
    raw_file = demo / "ultrafeedback" / "train_prefs.jsonl"
    code, out, _ = run(capsys, "data", "binarize", raw_file, "--output", tmp_path / "x.jsonl")
    assert code == 0
    assert out.splitlines()[0] == (
        f"read 24 rows from {raw_file}; wrote 24 pairs to {tmp_path / 'x.jsonl'} (score=overall, seed=42)"
    )
    raws, pairs = read_jsonl(raw_file), read_jsonl(tmp_path / "x.jsonl")
    assert len(pairs) == 24
    for raw, pair in zip(raws, pairs, strict=True):
        user = {"role": "user", "content": raw["instruction"]}
        assert pair["prompt"] == raw["instruction"]
        assert pair["chosen"] == [user, {"role": "assistant", "content": _best_response(raw)}]
        assert pair["rejected"][0] == user and pair["rejected"] != pair["chosen"]
        responses = [c["response"] for c in raw["completions"]]
        assert pair["rejected"][1]["content"] in responses
        assert pair["score_chosen"] >= pair["score_rejected"]


def test_binarize_missing_input(tmp_path, capsys):
    err = user_error(capsys, "data", "binarize", tmp_path / "nope.jsonl", "--output", tmp_path / "x.jsonl")
    assert err == f"error: {tmp_path / 'nope.jsonl'}: no such file or folder; check the path\n"


def _broken_copies(demo: Path, folder: Path) -> dict[str, Path]:
    """Five raw UltraFeedback rows with row 3 broken in three ways: invalid UTF-8, a truncated last line (row 3 is
    then the last), and a completion without its response."""
    lines = (demo / "ultrafeedback" / "train_prefs.jsonl").read_bytes().splitlines(keepends=True)[:5]
    folder.mkdir()
    bad_utf8 = lines[2].replace(b'"instruction": "', b'"instruction": "caf\xe9 ', 1)
    assert bad_utf8 != lines[2]
    row = json.loads(lines[2])
    del row["completions"][1]["response"]
    files = {
        "utf8": lines[:2] + [bad_utf8] + lines[3:],
        "truncated": lines[:2] + [lines[2][:120]],
        "field": lines[:2] + [json.dumps(row).encode() + b"\n"] + lines[3:],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_bytes(b"".join(content))
    return paths


@pytest.mark.parametrize(
    "case, where, reason",
    [
        ("utf8", "row 3", "invalid UTF-8 at byte {byte} of the line; re-save the file as UTF-8"),
        ("truncated", "row 3", "the last line is cut off"),
        ("field", "row 3, field 'completions[1].response'", "missing or empty response"),
    ],
)
def test_binarize_bad_row_names_file_row_and_field(case, where, reason, tmp_path, demo, capsys):
    broken = _broken_copies(demo, tmp_path / "raw")[case]
    out = tmp_path / "x.jsonl"
    err = user_error(capsys, "data", "binarize", broken, "--output", out)
    byte = broken.read_bytes().splitlines()[2].find(b"\xe9") + 1
    assert err.startswith(f"error: {broken}, {where}: {reason.format(byte=byte)}")
    assert err.rstrip().endswith(
        f"pass --skip-invalid to skip such rows and list them in {tmp_path / 'x.rejects.jsonl'}"
    )
    assert not out.exists(), "a failed run must not leave a partial output"


def test_binarize_skip_invalid_writes_the_rejects_and_counts_them(tmp_path, demo, capsys):
    broken = _broken_copies(demo, tmp_path / "raw")["field"]
    code, out, _ = run(capsys, "data", "binarize", broken, "--output", tmp_path / "x.jsonl", "--skip-invalid")
    assert code == 0
    assert f"wrote 4 pairs to {tmp_path / 'x.jsonl'}" in out
    assert "skipped 1: missing or empty response (rows 3)" in out
    assert len(read_jsonl(tmp_path / "x.jsonl")) == 4
    [reject] = read_jsonl(tmp_path / "x.rejects.jsonl")
    assert (reject["file"], reject["row"], reject["field"]) == (str(broken), 3, "completions[1].response")


# --------------------------------------------------------------------------------------------- data clean-ultrachat


def test_clean_ultrachat_writes_the_200k_schema(tmp_path, demo, capsys):
    raw_file = demo / "ultrachat" / "train_sft.jsonl"
    code, out, _ = run(capsys, "data", "clean-ultrachat", raw_file, "--output", tmp_path / "y.jsonl")
    assert code == 0
    assert out.splitlines()[0] == f"read 24 dialogues from {raw_file}; wrote 24 to {tmp_path / 'y.jsonl'}"
    raws, rows = read_jsonl(raw_file), read_jsonl(tmp_path / "y.jsonl")
    for raw, row in zip(raws, rows, strict=True):
        # The demo's turns start in uppercase and never disclaim opinions, so neither rule changes them.
        roles = ["user", "assistant"] * (len(raw["data"]) // 2)
        assert row["messages"] == [{"role": r, "content": c} for r, c in zip(roles, raw["data"], strict=True)]
        assert row["prompt"] == raw["data"][0]


def test_clean_ultrachat_bad_row(tmp_path, demo, capsys):
    raw = tmp_path / "raw.jsonl"
    good = (demo / "ultrachat" / "train_sft.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    raw.write_text("\n".join([*good, json.dumps({"id": "x", "data": ["hi", 3]})]) + "\n", encoding="utf-8")
    err = user_error(capsys, "data", "clean-ultrachat", raw, "--output", tmp_path / "y.jsonl")
    assert err.startswith(f"error: {raw}, row 3, field 'data[1]': ")


# ------------------------------------------------------------------------------------------------- recipe mistakes


def _prepare_dpo(tiny_model_dir: Path, demo: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "data", "prepare", "dpo", "--config", str(DPO_RECIPE), "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(demo / "ultrafeedback"), "--output_dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip


def test_unknown_recipe_key_suggests_the_closest(tiny_model_dir, demo, tmp_path, capsys):
    err = user_error(capsys, *_prepare_dpo(tiny_model_dir, demo, tmp_path, "--learning_rat", "1"))
    assert "'learning_rat'" in err and "did you mean 'learning_rate'?" in err


def test_out_of_range_recipe_value(tiny_model_dir, demo, tmp_path, capsys):
    err = user_error(capsys, *_prepare_dpo(tiny_model_dir, demo, tmp_path, "--learning_rate", "-1"))
    assert err.startswith("error: learning_rate = -1") and "out of range" in err


def test_missing_config_file(tmp_path, capsys):
    err = user_error(capsys, "data", "prepare", "sft", "--config", tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in err and "does not exist" in err


def test_unknown_schema(tiny_model_dir, demo, tmp_path, capsys):
    err = user_error(capsys, *_prepare_dpo(tiny_model_dir, demo, tmp_path, "--schema", "ultrafeedbak"))
    assert "unknown schema 'ultrafeedbak'" in err
    err = user_error(
        capsys, "data", "inspect", demo / "ultrafeedback", "--schema", "nope", "--model", tiny_model_dir
    )
    assert "unknown schema 'nope'" in err
