"""
A byte-level BPE tokenizer trained on a small corpus, as Qwen3's tokenizer class, with chat tokens; or, for the shapes
world, which writes lower case only, an uncased one that lower-cases what users type.
"""

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, TokenizersBackend


CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, lowercase: bool = False) -> TokenizersBackend:
    """
    BPE with the byte alphabet (so any text encodes), trained on `texts`; EMMA's tokens come with the processor. A
    `Qwen2Tokenizer`, or with `lowercase` the same tokenizer lower-casing its input.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    # Qwen2Tokenizer builds Qwen3's pre-tokenizer and decoder around the trained vocabulary; its class rebuilds a
    # fixed normaliser on load, so the lower-casing one travels in a plain `tokenizer.json` (TokenizersBackend).
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None, **special)
    if not lowercase:
        return tokenizer
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    return TokenizersBackend(tokenizer_object=backend, **special)
