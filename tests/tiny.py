"""Tiny random-initialised models and a byte-level tokenizer built in code, for fast CPU tests.

`tiny_tokenizer()` is a byte-level BPE with `<s>`, `</s>` (eos, also pad) and `<unk>`, and a ChatML-like chat template
of its own (so `chat_template: auto` has something to use). `tiny_model(tokenizer)` is a 2-layer Llama with random
weights. `save_tiny(dir)` writes both as a Hugging Face model folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Write exactly five words about the sea.",
    "Hello! How can I help you today?",
    "<|system|> <|user|> <|assistant|> <|im_start|> <|im_end|> user assistant system",
    "0123456789 , . ! ? : ; - ( ) [ ] \" ' \n",
]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    tok.chat_template = chat_template
    return tok


def _tiny(model_class, config_class, tokenizer, *, seed: int, hidden_size: int, num_layers: int, **shape):
    tokenizer = tokenizer or tiny_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    return model_class(config)


def tiny_model(tokenizer=None, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(LlamaForCausalLM, LlamaConfig, tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                 max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


def tiny_mistral(tokenizer=None, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A 2-layer model of Mistral-7B's class and shape family: MistralForCausalLM, grouped-query attention (4 query
    heads on 2 key/value heads, as 32 on 8) and an untied LM head."""
    from transformers import MistralConfig, MistralForCausalLM

    return _tiny(MistralForCausalLM, MistralConfig, tokenizer, seed=seed, hidden_size=hidden_size,
                 num_layers=num_layers, max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip


def save_tiny(directory: str | Path, *, seed: int = 0, build=tiny_model) -> Path:
    """BUILD's model (the tiny Llama by default) and the tokenizer, saved as a Hugging Face model folder."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    build(tokenizer, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_mistral(directory: str | Path, *, seed: int = 0) -> Path:
    return save_tiny(directory, seed=seed, build=tiny_mistral)
