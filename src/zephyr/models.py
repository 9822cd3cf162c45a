"""Loading any model or tokenizer by name, folder or hub id, from safetensors weights only.

A name is resolved (`resolve_model`) to one of: the cached folder of an embedded model (fetched on first use by
`zephyr.fetch`), a local folder written by `save_pretrained`, or a Hugging Face hub id. None means the embedded
default, `EMBEDDED_MODEL`.

Loads read safetensors only: pickled `.bin` weights can run arbitrary code when loaded.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from zephyr.errors import ConfigError, ZephyrError
from zephyr.fetch import (
    EMBEDDED_MODEL,
    EMBEDDED_MODELS,
    fetch_embedded_model,
)

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
