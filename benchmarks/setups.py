"""The random models and inputs the rows run on: `mid` (the CPU table) and `smoke` (CI keeps the suite working)."""

import copy
from dataclasses import dataclass

import torch

from emma_hf import EmmaConfig, EmmaForConditionalGeneration, EmmaImageProcessor, EmmaPipeline, EmmaProcessor
from emma_hf.configuration_emma import PRESETS
from emma_hf.hub import sync_special_tokens
from emma_hf.shapes.data import corpus
from emma_hf.shapes.tokenizer import train_bpe_tokenizer


@dataclass(frozen=True)
class Sizes:
    name: str
    text_config: dict
    backbone_tokens: int  # row 1: half text, half one generated image
    image_side: int  # rows 3, 4: the generated (and source) image
    pipeline_side: int  # row 6
    pipeline_steps: int
    prompt_words: int
    decode_tokens: int
    train_batch: int  # row 8: samples per task
    train_side: int
    loading_text_config: dict  # row 7: about 1B parameters in `mid`
    repeats: int


MID_TEXT = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
}
SIZES = {
    "mid": Sizes(
        name="mid",
        text_config=MID_TEXT,
        backbone_tokens=512,
        image_side=512,
        pipeline_side=256,
        pipeline_steps=10,
        prompt_words=48,
        decode_tokens=48,
        train_batch=2,
        train_side=256,
        loading_text_config={
            **MID_TEXT,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 12,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
        repeats=5,
    ),
    "smoke": Sizes(
        name="smoke",
        text_config={},
        backbone_tokens=32,
        image_side=64,
        pipeline_side=64,
        pipeline_steps=2,
        prompt_words=4,
        decode_tokens=4,
        train_batch=1,
        train_side=64,
        loading_text_config={},
        repeats=1,
    ),
}


def emma_config(text_overrides: dict, **overrides) -> EmmaConfig:
    """The `tiny` preset's vision tower and DC-AE around a decoder of the given size."""
    preset = copy.deepcopy(PRESETS["tiny"])
    preset["text_config"].update(text_overrides)
    return EmmaConfig(**{**preset, **overrides})


def random_emma(text_overrides: dict, seed: int = 0) -> EmmaForConditionalGeneration:
    torch.manual_seed(seed)
    return EmmaForConditionalGeneration(emma_config(text_overrides)).eval()


def benchmark_processor(side: int) -> EmmaProcessor:
    """A processor with a small BPE tokenizer trained on the shapes world's sentences, drawing `side`-px squares."""
    tokenizer = train_bpe_tokenizer(corpus(0), vocab_size=300)
    return EmmaProcessor(EmmaImageProcessor(size={"height": side, "width": side}), tokenizer)


def benchmark_pipeline(model: EmmaForConditionalGeneration, side: int) -> EmmaPipeline:
    processor = benchmark_processor(side)
    sync_special_tokens(model, processor)
    pipe = EmmaPipeline.from_model(model, processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def long_prompt(words: int) -> str:
    """A prompt of about `words` words from the shapes world."""
    sentence = "a red circle above a blue square and a green triangle to the left of a yellow circle".split()
    return " ".join((sentence * (words // len(sentence) + 1))[:words])
