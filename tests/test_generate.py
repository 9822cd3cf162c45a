"""`zephyr generate`: batch answers for a JSONL file, resumable, and bad rows named before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zephyr.cli import main
from zephyr.errors import DataError
from zephyr.generate import read_prompts


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [
    {"id": "a", "prompt": "What is 12 + 30?", "topic": "math"},
    {"prompt": "Hello!"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]},
    {"id": 7, "prompt": "Write five words.", "system": "Be brief."},
]  # fmt: skip


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_every_row_and_a_rerun_skips_them(tmp_path, tiny_model_dir, capsys):
    src, out = _write(tmp_path / "in.jsonl", ROWS), tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(out),
            "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "3"]  # fmt: skip
    assert main(args) == 0
    rows = _read(out)
    assert [r["id"] for r in rows] == ["a", "line-2", "line-3", 7]
    assert rows[0]["topic"] == "math" and rows[3]["system"] == "Be brief."
    for r in rows:
        assert (
            r["finish_reason"] in {"stop", "length"}
            and r["completion_tokens"] <= 6
            and r["prompt_tokens"] > 0
        )
    assert "4 answered, 0 already" in capsys.readouterr().out

    # an interrupted run: the last two rows missing, the last kept line cut short
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:10])
    assert main(args) == 0
    again = _read(out)
    assert [r["id"] for r in again] == ["a", "line-2", "line-3", 7]
    assert again[2]["answer"] == rows[2]["answer"]  # greedy: the redone rows equal the first run's
    assert "2 answered, 2 already" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad, field, reason",
    [
        ("{oops", None, "not valid JSON"),
        ({"text": "hi"}, None, "exactly one of"),
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages", "end with a user"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "role"),
        ({"prompt": "x", "system": 3}, "system", "string"),
        ({"id": "a", "prompt": "again"}, "id", "also used on line 1"),
    ],
)  # fmt: skip
def test_bad_rows_are_named_by_line_and_field(tmp_path, bad, field, reason):
    src = _write(tmp_path / "in.jsonl", [ROWS[0], bad])
    with pytest.raises(DataError) as err:
        read_prompts(src)
    assert err.value.row == 2 and err.value.field == field and reason in str(err.value)


def test_cli_reports_a_bad_row_without_loading_the_model(tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", [ROWS[0], {"prompt": 5}])
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "no-such-model"),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "in.jsonl" in err and "row 2" in err and "prompt" in err and "Traceback" not in err


def test_a_rerun_resumes_only_what_the_same_model_and_settings_made(tmp_path, tiny_model_dir, capsys):
    """The reproduction: answers were reused after the model at the same path was retrained, or after
    --max-new-tokens changed. Now a rerun continues only when OUTPUT.run.json names the same model files and
    settings; otherwise it refuses, and --overwrite starts over."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    src, out = _write(tmp_path / "in.jsonl", ROWS[:2]), tmp_path / "out.jsonl"
    args = ["generate", "--model", str(model), "--input", str(src), "--output", str(out), "--temperature", "0",
            "--max-new-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert record["settings"]["max_new_tokens"] == 4 and "model.safetensors" in record["model"]["files"]
    assert main(args) == 0 and "0 answered, 2 already" in capsys.readouterr().out

    assert main([*args[:-1], "8"]) == 2  # other settings
    assert (
        "made by another model or other settings (settings.max_new_tokens: 4 then, 8 now)"
        in capsys.readouterr().err
    )

    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # retrained in place: same path, same size, new file
    assert main(args) == 2
    refused = capsys.readouterr().err
    assert "model.files.model.safetensors" in refused and "Pass --overwrite to start it again" in refused

    assert main([*args, "--overwrite"]) == 0
    assert "2 answered, 0 already" in capsys.readouterr().out
    assert main(args) == 0 and "0 answered, 2 already" in capsys.readouterr().out
