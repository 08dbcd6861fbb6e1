# Copyright 2026 The emma_hf authors. Licensed under the Apache License, Version 2.0.
"""EMMA (arXiv 2512.04810): one Qwen3 backbone that reads images, answers in text and draws images by flow matching.

Data flow: a context image goes through SigLIP2 (with MoE MLPs, 2x2 pixel-unshuffled) and through the frozen DC-AE
encoder; both give one token per 32x32 cell and are concatenated on channels, then `und_adapter` maps them to the
decoder. A generated image is a grid of noisy DC-AE latents mapped by `gen_adapter` plus a timestep embedding. Every
token belongs to a stream, `und` (text, context images) or `gen` (noisy latents); decoder parts listed by
`EmmaConfig.decoupled_modules` have one copy per stream, attention is always joint. `lm_head` reads `und` tokens,
`velocity_head` reads `gen` tokens.
"""

import copy
import functools
import inspect
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_dc import AutoencoderDC
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed_from_grid
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.siglip2.modeling_siglip2 import (
    Siglip2Encoder,
    Siglip2EncoderLayer,
    Siglip2MLP,
    Siglip2VisionEmbeddings,
)
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ModelOutput,
    cached_file,
    can_return_tuple,
)
from transformers.utils import logging as transformers_logging
from transformers.utils.loading_report import log_state_dict_report

from .configuration_emma import EmmaConfig, check_not_an_export, clearer_load_error


ImageInput = torch.Tensor | Sequence[torch.Tensor]
CONTEXT_IMAGE_INPUTS = ("pixel_values", "vae_pixel_values", "image_grid_hw")

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: in model outputs, in `forward` arguments
# and in what `generate()` and activation checkpointing hand over. EMMA uses the installed release's name, so one
# source runs on the floor release (5.23) and on the newest.
# `from_pretrained` keyword arguments that say where and how to fetch a Hub file.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only")
CACHE_NAME = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
# flex attention's block size: its `BlockMask` covers whole blocks of this many queries and keys.
FLEX_BLOCK_SIZE = 128


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """
    The KV cache given as `cache`, or as `past_key_values`: the name transformers < 5.24 passes, and which its
    `generate()` accepts only from models whose `forward` declares it.
    """
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the KV cache once, as `cache` (or `past_key_values` on transformers < 5.24), not both")
    return past_key_values if cache is None else cache


def model_output(output_class: type) -> type:
    """
    A `ModelOutput` dataclass whose `cache` field carries the installed transformers' name for it: `generate()` and
    beam search look the cache up in outputs by that name.
    """
    if CACHE_NAME != "cache":
        annotations = inspect.get_annotations(output_class)
        output_class.__annotations__ = {CACHE_NAME if n == "cache" else n: t for n, t in annotations.items()}
        setattr(output_class, CACHE_NAME, output_class.__dict__["cache"])
        delattr(output_class, "cache")
    return dataclass(output_class)


@model_output
class EmmaModelOutputWithPast(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Decoder output after the final norm of each token's stream.
    cache (`Cache`, *optional*): the KV cache, when `use_cache=True` (`past_key_values` on transformers < 5.24).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): embeddings and every layer's output.
    gen_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): which tokens are generated-image tokens.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    gen_mask: torch.BoolTensor | None = None


@model_output
class EmmaCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): `ce_weight * ce_loss + fm_weight * fm_loss` over the terms present.
    ce_loss (`torch.FloatTensor`, *optional*): next-token cross-entropy, when `labels` are given.
    fm_loss (`torch.FloatTensor`, *optional*): flow-matching MSE between `velocity` and `noise - x0`.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): next-token scores.
    velocity (`torch.FloatTensor` of shape `(num_gen_tokens, latent_channels)`, *optional*): predicted velocity of
        every generated-image token, in the order the tokens appear (row by row, each image's cells row-major).
    cache, hidden_states: as in [`EmmaModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    fm_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    velocity: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EmmaContext:
    """
    A prompt (text and context images) encoded once, against which every denoising step runs only the gen tokens.

    cache: KV cache of the prompt. It is only read by [`EmmaForConditionalGeneration.predict_velocity`].
    attention_mask: `(batch_size, context_length)`, 0 on padding.
    next_position_ids: `(batch_size,)`, the RoPE index that the generated image's tokens share.
    step_masks: the attention mask of a denoising step, by gen-token count, attention implementation, dtype and
        device: the same for every step against this context, so built once.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position_ids: torch.Tensor
    step_masks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def select(self, rows: Sequence[int] | torch.Tensor) -> "EmmaContext":
        """The context of the given rows, in that order (rows may repeat: one prompt, several images)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        cache = DynamicCache()
        for layer_idx, layer in enumerate(self.cache.layers):
            layer_rows = rows.to(layer.keys.device)
            cache.update(layer.keys[layer_rows], layer.values[layer_rows], layer_idx)
        return EmmaContext(
            cache, self.attention_mask[rows], self.next_position_ids[rows.to(self.next_position_ids.device)]
        )


# ---------------------------------------------------------------------------------------------------------------------
# Token layout: streams, image blocks, positions and the attention mask
# ---------------------------------------------------------------------------------------------------------------------


class RowPermutation(torch.autograd.Function):
    """
    `x.index_select(0, order)` for a permutation `order`. Its gradient is the inverse gather, where autograd's
    generic rule scatters with `index_add_`: on CPU that made a shapes-model training step about a fifth slower.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse_order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_order)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse_order,) = ctx.saved_tensors
        return grad_output.index_select(0, inverse_order), None, None


class TokenStreams:
    """
    Which tokens are `und` and which are `gen`, as flat indices built once per forward.

    A part with a `gen` copy runs each stream's tokens through its own copy; a sequence of one stream (chat, a cached
    denoising step) skips the routing altogether.
    """

    def __init__(self, gen_mask: torch.Tensor | None):
        self.num_gen = 0 if gen_mask is None else int(gen_mask.sum())
        self.num_tokens = 0 if gen_mask is None else gen_mask.numel()
        self.all_und = self.num_gen == 0
        self.all_gen = not self.all_und and self.num_gen == self.num_tokens
        if not (self.all_und or self.all_gen):
            self.order = torch.argsort(gen_mask.reshape(-1).to(torch.int8), stable=True)
            self.inverse_order = torch.argsort(self.order)

    @classmethod
    def only_gen(cls) -> "TokenStreams":
        """Every token is a gen token (a cached denoising step): nothing to build or count on the hot path."""
        streams = cls(None)
        streams.all_und, streams.all_gen = False, True
        return streams

    def apply(self, und_module: nn.Module, gen_module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """Run `x` (batch, seq, ...) through the module of each token's stream."""
        if gen_module is None or self.all_und:
            return und_module(x)
        if self.all_gen:
            return gen_module(x)
        batch, seq = x.shape[:2]
        flat = x.reshape(batch * seq, *x.shape[2:])
        und_in, gen_in = RowPermutation.apply(flat, self.order, self.inverse_order).split(
            [self.num_tokens - self.num_gen, self.num_gen]
        )
        out = RowPermutation.apply(torch.cat([und_module(und_in), gen_module(gen_in)]), self.inverse_order, self.order)
        return out.reshape(batch, seq, *out.shape[1:])


def find_image_blocks(
    input_ids: torch.Tensor, config: EmmaConfig, images: bool = True, gen: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Mark context-image and gen tokens and number each run of placeholders as one image block (-1 for text).
    Placeholders of a kind switched off (`images`, `gen`) are plain text.

    Returns `image_mask`, `gen_mask` and `block_ids`, all `(batch, seq)`.
    """
    image_mask = (input_ids == config.image_token_id) & images
    gen_mask = (input_ids == config.gen_token_id) & gen
    visual = image_mask | gen_mask
    previous = F.pad(input_ids[:, :-1], (1, 0), value=-1)
    starts = visual & (input_ids != previous)
    block_ids = torch.where(visual, starts.long().cumsum(-1) - 1, -1)
    return image_mask, gen_mask, block_ids


def check_image_runs(input_ids: torch.Tensor, token_id: int, expected: list[int], argument: str) -> None:
    """Each run of `token_id` placeholders must hold exactly the tokens of the next image, in order."""
    is_placeholder = input_ids == token_id
    previous = F.pad(input_ids[:, :-1], (1, 0), value=-1)
    run_ids = ((is_placeholder & (input_ids != previous)).reshape(-1).long().cumsum(0) - 1)[is_placeholder.reshape(-1)]
    found = torch.bincount(run_ids).tolist() if run_ids.numel() else []
    if found != expected:
        raise ValueError(
            f"input_ids hold runs of {found} placeholder tokens (id {token_id}) but `{argument}` gives images of "
            f"{expected} tokens; each image needs one run of (H/32)*(W/32) placeholders, images in order of appearance"
        )


def check_prompt_inputs(attention_mask: torch.Tensor | None, images: dict[str, ImageInput | None]) -> None:
    """A prompt's rows must attend to something, and its images hold finite values (NaN would give text anyway)."""
    if attention_mask is not None:
        empty_rows = (attention_mask == 0).all(dim=-1).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"attention_mask masks every token of rows {empty_rows}; each row needs a token to read")
    for name, value in images.items():
        tensors = [value] if isinstance(value, torch.Tensor) else value or []
        if any(isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all() for tensor in tensors):
            raise ValueError(f"{name} holds NaN or inf; images must hold finite values")


def check_token_ids(input_ids: torch.Tensor, num_embeddings: int) -> None:
    """Ids outside the embedding table would fail deep inside torch; name the cause instead."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}")
    low, high = (int(value) for value in torch.aminmax(input_ids))
    if low < 0 or high >= num_embeddings:
        raise ValueError(
            f"input_ids must be token ids in [0, {num_embeddings}) (rows of the embedding table), got ids in "
            f"[{low}, {high}]; a tokenizer with tokens the model lacks needs "
            "emma_hf.hub.sync_special_tokens(model, processor), which grows the embeddings"
        )


def check_position_budget(position_ids: torch.Tensor, extra: int, config: EmmaConfig, what: str) -> None:
    """A prompt (plus `extra` positions still to come) must fit in the RoPE positions the decoder was built for."""
    needed = int(position_ids.max()) + 1 + extra
    limit = config.text_config.max_position_embeddings
    if needed > limit:
        raise ValueError(
            f"{what} needs {needed} positions but the model takes at most {limit} "
            "(text_config.max_position_embeddings); shorten the prompt"
        )


def check_image_grid(pixel_values: ImageInput, image_grid_hw: torch.Tensor, cell: int) -> None:
    """The processor's token grid per image must be the one the pixels give."""
    from_pixels = [[image.shape[-2] // cell, image.shape[-1] // cell] for image in pixel_values]
    if torch.as_tensor(image_grid_hw).reshape(-1, 2).tolist() != from_pixels:
        raise ValueError(
            f"image_grid_hw {torch.as_tensor(image_grid_hw).tolist()} does not match the token grids of pixel_values "
            f"{from_pixels}"
        )


def images_per_row(input_ids: torch.Tensor, config: EmmaConfig) -> list[int]:
    """How many context images each row's placeholders stand for."""
    _, _, block_ids = find_image_blocks(input_ids, config, gen=False)
    return (advances_position(block_ids) & (block_ids >= 0)).sum(-1).tolist()


def rope_position_ids(segment_ids: torch.Tensor, image_starts_or_text: torch.Tensor) -> torch.Tensor:
    """
    RoPE indices: +1 per text token and per image (all tokens of an image share one index), restarting at 0 in every
    packed sample, 0 on padding.
    """
    advance = (image_starts_or_text & (segment_ids != 0)).long()
    count = advance.cumsum(-1)
    batch, seq = segment_ids.shape
    sample_start = segment_ids != F.pad(segment_ids[:, :-1], (1, 0), value=-1)
    index = torch.arange(seq, device=segment_ids.device).expand(batch, seq)
    start_index = torch.where(sample_start, index, 0).cummax(-1).values
    before_sample = count.gather(1, start_index) - advance.gather(1, start_index)
    return (count - before_sample - 1).clamp(min=0)


def emma_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: EmmaConfig
) -> torch.Tensor:
    """RoPE indices of a whole prompt, following EMMA's image rule (see [`rope_position_ids`])."""
    segment_ids = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    _, _, block_ids = find_image_blocks(input_ids, config)
    return rope_position_ids(segment_ids, advances_position(block_ids))


def advances_position(block_ids: torch.Tensor) -> torch.Tensor:
    """Tokens that move the RoPE index on: every text token and the first token of each image."""
    return (block_ids < 0) | (block_ids != F.pad(block_ids[:, :-1], (1, 0), value=-1))


def visible_keys(
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    query_blocks: torch.Tensor,
    key_blocks: torch.Tensor,
    key_gen: torch.Tensor,
    query_segments: torch.Tensor,
    key_segments: torch.Tensor,
) -> torch.Tensor:
    """
    EMMA's attention rule on broadcastable per-query and per-key values, so that the dense mask and flex
    attention's `mask_mod` share it: text is causal; an image's tokens see each other and all earlier context; only
    gen tokens of the same image see a gen token; packed samples (distinct positive segment ids) never see each
    other; padding (segment 0) is seen by nobody; every token sees itself.
    """
    causal = query_index >= key_index
    same_block = (query_blocks == key_blocks) & (query_blocks >= 0)
    visible = (causal & ~key_gen) | same_block
    same_sample = (query_segments == key_segments) & (key_segments > 0)
    return (visible & same_sample) | (query_index == key_index)


@dataclass
class KeyLayout:
    """
    Per-token values [`visible_keys`] reads, `(batch, queries)` and `(batch, keys)`. Keys are the cache's slots:
    `[0, past_length)` hold context tokens (text to the rule: a cache never holds gen tokens), the new tokens go to
    `[past_length, past_length + queries)`, and later slots (a static cache's unfilled room) have segment 0.
    """

    query_index: torch.Tensor
    query_blocks: torch.Tensor
    query_segments: torch.Tensor
    key_blocks: torch.Tensor
    key_gen: torch.Tensor
    key_segments: torch.Tensor

    @classmethod
    def build(
        cls,
        gen_mask: torch.Tensor,
        block_ids: torch.Tensor,
        key_segment_ids: torch.Tensor,
        past_length: int | torch.Tensor,
    ) -> "KeyLayout":
        """`past_length` may be a 0-d tensor (a static cache's count while a decode step compiles): no host sync."""
        batch, num_queries = gen_mask.shape
        device = gen_mask.device
        query_index = torch.arange(num_queries, device=device) + past_length
        key_shape = key_segment_ids.shape
        if isinstance(past_length, int):
            # Known on the host (prompts, dynamic caches): padding by slices, which inductor's CPU code generation
            # compiles (torch 2.13 emits invalid C++ for the gather/scatter form within a whole-forward graph).
            after = key_shape[1] - past_length - num_queries
            query_segments = key_segment_ids[:, past_length : past_length + num_queries]
            key_blocks = F.pad(block_ids, (past_length, after), value=-1)
            key_gen = F.pad(gen_mask, (past_length, after), value=False)
        else:
            slots = query_index.expand(batch, num_queries)
            query_segments = key_segment_ids.gather(1, slots)
            key_blocks = torch.full(key_shape, -1, dtype=block_ids.dtype, device=device).scatter(1, slots, block_ids)
            key_gen = torch.zeros(key_shape, dtype=torch.bool, device=device).scatter(1, slots, gen_mask)
        return cls(
            query_index=query_index,
            query_blocks=block_ids,
            query_segments=query_segments,
            key_blocks=key_blocks,
            key_gen=key_gen,
            key_segments=key_segment_ids,
        )

    def block_mask(self) -> BlockMask:
        """
        The same rule as flex attention's `BlockMask`, for `attn_implementation="flex_attention"`. The values its
        `mask_mod` reads are padded to whole blocks of 128 tokens and marked static: torch's CPU flex kernel fails to
        compile (C++ errors) once they have dynamic sizes, and whole blocks keep one graph for the decode steps of a
        growing cache until a block fills.
        """
        (batch, num_queries), num_keys = self.query_blocks.shape, self.key_segments.shape[1]

        def whole_blocks(values: torch.Tensor) -> torch.Tensor:
            values = F.pad(values, (0, -values.shape[-1] % FLEX_BLOCK_SIZE))
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static(values)
            return values

        query_index, query_blocks, query_segments, key_blocks, key_gen, key_segments = (
            whole_blocks(values)
            for values in (
                self.query_index,
                self.query_blocks,
                self.query_segments,
                self.key_blocks,
                self.key_gen,
                self.key_segments,
            )
        )

        def mask_mod(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
            return visible_keys(
                query_index[query],
                key,
                query_blocks[batch, query],
                key_blocks[batch, key],
                key_gen[batch, key],
                query_segments[batch, query],
                key_segments[batch, key],
            )

        return create_block_mask(mask_mod, batch, None, num_queries, num_keys, device=self.key_segments.device)

    def dense(self) -> torch.Tensor:
        """Boolean `(batch, 1, queries, keys)` mask, True where a query may attend."""
        key_index = torch.arange(self.key_segments.shape[1], device=self.key_segments.device)
        return visible_keys(
            self.query_index[None, :, None],
            key_index[None, None, :],
            self.query_blocks[:, :, None],
            self.key_blocks[:, None, :],
            self.key_gen[:, None, :],
            self.query_segments[:, :, None],
            self.key_segments[:, None, :],
        )[:, None]


def to_attention_implementation(
    layout: KeyLayout, implementation: str, dtype: torch.dtype
) -> torch.Tensor | BlockMask:
    """sdpa takes the boolean mask, eager adds it to the scores, flex attention reads it as a `BlockMask`."""
    if implementation == "flex_attention":
        return layout.block_mask()
    mask = layout.dense()
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def cached_length(cache: Cache | None) -> int | torch.Tensor:
    """
    Tokens already in `cache`. A static cache counts them in a tensor: read on the host in eager mode, kept a tensor
    while `torch.compile` traces a decode step (generate compiles those only), so that the step is one graph.
    """
    if cache is None:
        return 0
    length = cache.get_seq_length()
    if isinstance(length, torch.Tensor) and not torch.compiler.is_compiling():
        return int(length)
    return length


def key_segments(
    attention_mask: torch.Tensor | None,
    batch: int,
    num_keys: int,
    past_length: int | torch.Tensor,
    seq: int,
    device: torch.device,
) -> torch.Tensor:
    """
    Segment id of every key slot, `(batch, num_keys)`: `attention_mask` (`(batch, past + seq)`, or already padded
    to a static cache's room), with 0 on the slots no token fills yet.
    """
    if attention_mask is None:
        filled = torch.arange(num_keys, device=device) < past_length + seq
        return filled.long().expand(batch, num_keys)
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, past + seq), got shape {tuple(attention_mask.shape)}")
    # While compiling a decode step the count is a tensor and the mask comes padded from `create_masks_for_generate`.
    lengths = {num_keys} if isinstance(past_length, torch.Tensor) else {past_length + seq, num_keys}
    if attention_mask.shape[0] != batch or attention_mask.shape[1] not in lengths:
        expected = " or ".join(f"({batch}, {length})" for length in sorted(lengths))
        raise ValueError(
            f"attention_mask must cover the cache and the new tokens, shape {expected}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return F.pad(attention_mask.to(device=device, dtype=torch.long), (0, num_keys - attention_mask.shape[1]))


class ContextKVView:
    """Reads a context's KV cache and appends this step's keys without storing them, so the context is reusable."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)


def execution_device(module: nn.Module) -> torch.device:
    """
    Where `module` computes: the device of its weights, or, when accelerate offloads them (`device_map` with "disk"
    or "cpu" offload; the weights then wait on the meta device), the device its hook brings them to.
    """
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def compute_dtype(module: nn.Module) -> torch.dtype:
    """
    The dtype `module` computes in: that of its first floating-point parameter. Quantised weights (bitsandbytes'
    int8 and packed 4-bit tensors) are storage, not a dtype to cast inputs to.
    """
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def as_image_list(images: ImageInput, argument: str, channels: int | None = None) -> list[torch.Tensor]:
    """Accept a `(N, C, H, W)` tensor or a sequence of `(C, H, W)` tensors of any sizes."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(
                f"{argument} must be (num_images, channels, height, width) or a list of (C, H, W), got shape {tuple(images.shape)}"
            )
        images = list(images)
    if not isinstance(images, (list, tuple)) or not all(isinstance(image, torch.Tensor) for image in images):
        raise TypeError(f"{argument} must be a tensor or a list of tensors, got {type(images).__name__}")
    for image in images:
        if image.ndim != 3 or (channels is not None and image.shape[0] != channels):
            raise ValueError(f"{argument} images must be ({channels or 'C'}, H, W), got shape {tuple(image.shape)}")
    return list(images)


def unpack_images(
    images: ImageInput | None, image_grid_hw: torch.Tensor | None, cell: int, argument: str
) -> ImageInput | None:
    """
    The processor's packed layout, `(sum of h*w, C*cell*cell)` with a row per visual token, back to a list of
    `(C, h*cell, w*cell)` images by `image_grid_hw`; no rows (text without images) -> None; other layouts as given.
    """
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return None
    if not isinstance(images, (torch.Tensor, list, tuple)):
        raise TypeError(
            f"{argument} must be a torch tensor or a list of tensors (the processor's return_tensors='pt'), got "
            f"{type(images).__name__}"
        )
    for image in [images] if isinstance(images, torch.Tensor) else images:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{argument} must hold torch tensors, got a {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(
                f"{argument} must hold floating-point pixels, normalised as the processor returns them; got "
                f"{image.dtype} (raw 0-255 images go through the processor)"
            )
    if not isinstance(images, torch.Tensor) or images.ndim != 2:
        return images
    if images.shape[0] == 0:
        return None
    if image_grid_hw is None:
        raise ValueError(f"{argument} is packed (a row per visual token) and needs image_grid_hw to split it")
    grid = torch.as_tensor(image_grid_hw)
    if (
        grid.is_floating_point()
        or grid.dtype == torch.bool
        or grid.ndim != 2
        or grid.shape[1] != 2
        or (grid < 1).any()
    ):
        raise ValueError(
            "image_grid_hw must be an integer (num_images, 2) tensor of token grids, each side at least 1, as the "
            f"processor returns it; got {grid.tolist()} ({grid.dtype})"
        )
    grids = grid.tolist()
    channels, remainder = divmod(images.shape[1], cell * cell)
    if remainder or sum(rows * cols for rows, cols in grids) != images.shape[0]:
        raise ValueError(
            f"{argument} of shape {tuple(images.shape)} does not hold the tokens of image_grid_hw {grids}: a row per "
            f"token of C*{cell}*{cell} pixels (the model's image_grid_size is {cell}; the processor's patch_size must "
            "match it)"
        )
    tokens = images.split([rows * cols for rows, cols in grids])
    return [
        image.reshape(rows, cols, channels, cell, cell)
        .permute(2, 0, 3, 1, 4)
        .reshape(channels, rows * cell, cols * cell)
        for image, (rows, cols) in zip(tokens, grids)
    ]


def group_by_size(images: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return groups


def flatten_grid(features: torch.Tensor) -> torch.Tensor:
    """`(C, h, w)` -> `(h*w, C)`, cells row-major: the order of an image's tokens."""
    return features.flatten(1).transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Understanding encoder: SigLIP2 with MoE MLPs
# ---------------------------------------------------------------------------------------------------------------------


class EmmaVisionMoeMLP(nn.Module):
    """SigLIP2 MLP experts (0 `versatile`, 1 `stem`, ...) mixed with one weight per image."""

    def __init__(self, vision_config, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList([Siglip2MLP(vision_config) for _ in range(num_experts)])

    def forward(self, hidden_states: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        output = None
        for expert_idx in (expert_weights != 0).any(0).nonzero().flatten().tolist():
            weights = expert_weights[:, expert_idx]
            rows = weights.nonzero().flatten()
            if rows.numel() == hidden_states.shape[0]:
                expert_out = self.experts[expert_idx](hidden_states) * weights[:, None, None]
            else:
                selected = self.experts[expert_idx](hidden_states[rows]) * weights[rows, None, None]
                expert_out = torch.zeros_like(hidden_states).index_add(0, rows, selected)
            output = expert_out if output is None else output + expert_out
        return output


class EmmaVisionMoeEncoderLayer(Siglip2EncoderLayer):
    def __init__(self, vision_config, num_experts: int):
        super().__init__(vision_config)
        self.mlp = EmmaVisionMoeMLP(vision_config, num_experts)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, expert_weights=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.layer_norm2(hidden_states), expert_weights)


class EmmaVisionEmbeddings(Siglip2VisionEmbeddings):
    """
    SigLIP2's patch and position embeddings, reading the position table by calling its embedding module rather than
    through `.weight`, so that accelerate's offload hooks bring the table in when the tower's weights are offloaded.
    """

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.LongTensor) -> torch.Tensor:
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=compute_dtype(self.patch_embedding)))
        rows = torch.arange(self.position_embedding.num_embeddings, device=patch_embeds.device)
        table = self.position_embedding(rows).reshape(self.position_embedding_size, self.position_embedding_size, -1)
        return patch_embeds + self.resize_positional_embeddings(
            table, spatial_shapes, max_length=pixel_values.shape[1]
        )


class EmmaVisionTower(nn.Module):
    """
    SigLIP2 vision encoder (NaFlex patches, no pooling head) whose `vision_moe_layers` have expert MLPs. One router,
    a linear layer on the mean of each image's hidden state as it enters the first MoE layer (what the encoder has
    understood of the image by then, not just its mean colour), decides once per image for all MoE layers. With the
    router forced to `versatile` it computes exactly `Siglip2VisionModel`'s `last_hidden_state`.
    """

    def __init__(self, config: EmmaConfig):
        super().__init__()
        vision_config = config.vision_config
        self.config = vision_config
        self.embeddings = EmmaVisionEmbeddings(vision_config)
        self.encoder = Siglip2Encoder(vision_config)
        for layer_idx in config.vision_moe_layers:
            self.encoder.layers[layer_idx] = EmmaVisionMoeEncoderLayer(vision_config, config.vision_num_experts)
        self.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.router = nn.Linear(vision_config.hidden_size, config.vision_num_experts)

    def route(self, hidden_states: torch.Tensor, patch_mask: torch.Tensor, mode: str) -> torch.Tensor:
        """
        Expert weights `(num_images, num_experts)`: one-hot except in `soft` mode. `top1` is straight-through: the
        forward uses the chosen expert alone, as at inference, while the router learns through the softmax.
        """
        num_experts = self.router.out_features
        if mode in ("versatile", "stem"):
            choice = torch.full(
                (hidden_states.shape[0],), 0 if mode == "versatile" else 1, device=hidden_states.device
            )
            return F.one_hot(choice, num_experts).to(hidden_states.dtype)
        weights = patch_mask.to(hidden_states.dtype)[..., None]
        pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        probabilities = self.router(pooled).softmax(-1)
        if mode == "soft":
            return probabilities
        chosen = F.one_hot(probabilities.argmax(-1), num_experts).to(hidden_states.dtype)
        return chosen + (probabilities - probabilities.detach())  # exactly one-hot in value

    def forward(
        self, patches: torch.Tensor, patch_mask: torch.Tensor, spatial_shapes: torch.Tensor, router_mode: str
    ) -> torch.Tensor:
        """`patches` `(N, max_patches, 3*p*p)` as SigLIP2's processor lays them out; returns `(N, max_patches, C)`."""
        hidden_states = self.embeddings(patches, spatial_shapes)
        encoder_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=patch_mask
        )
        expert_weights = None
        for layer in self.encoder.layers:
            if isinstance(layer, EmmaVisionMoeEncoderLayer) and expert_weights is None:
                expert_weights = self.route(hidden_states, patch_mask, router_mode)
            hidden_states = layer(hidden_states, encoder_mask, expert_weights=expert_weights)
        return self.post_layernorm(hidden_states)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(C, H, W)` -> `(H/p * W/p, p*p*C)` in SigLIP2's patch layout."""
    channels, height, width = image.shape
    patches = image.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return patches.permute(1, 3, 2, 4, 0).reshape((height // patch_size) * (width // patch_size), -1)


# ---------------------------------------------------------------------------------------------------------------------
# Adapters and embeddings
# ---------------------------------------------------------------------------------------------------------------------


class EmmaMLP(nn.Module):
    """Two linear layers with a GELU: the adapters into the decoder and the velocity head out of it."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept in high precision (`_keep_in_fp32_modules`), so its input may come from a decoder in another dtype.
        return self.linear_2(self.act(self.linear_1(x.to(compute_dtype(self.linear_1)))))


class EmmaTimestepEmbedding(nn.Module):
    """Sinusoidal features of `t * 1000` (t in [0, 1], diffusers' timestep scale) followed by an MLP."""

    def __init__(self, num_channels: int, hidden_size: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(num_channels, hidden_size)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = self.time_proj(timesteps.float() * 1000)
        return self.timestep_embedder(features.to(compute_dtype(self.timestep_embedder)))


@functools.lru_cache(maxsize=32)
def sincos_2d(height: int, width: int, dim: int, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """
    2-D sin-cos embeddings `(height*width, dim)` of cell coordinates times `scale`, row-major. Cached: every
    denoising step and every image of a batch asks for the same grid. Callers must not modify the result in place.
    """
    grid = torch.stack(
        torch.meshgrid(
            torch.arange(width, device=device, dtype=torch.float32) * scale,
            torch.arange(height, device=device, dtype=torch.float32) * scale,
            indexing="xy",
        )
    )
    return get_2d_sincos_pos_embed_from_grid(dim, grid)


# ---------------------------------------------------------------------------------------------------------------------
# Shared-and-decoupled Qwen3 decoder
# ---------------------------------------------------------------------------------------------------------------------

PART_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "mlp": "mlp",
}


class EmmaDecoderLayer(Qwen3DecoderLayer):
    """
    A Qwen3 layer whose parts hold the `und` weights under Qwen3's names; `gen` holds a copy of each decoupled part
    under the same relative name (`gen.self_attn.v_proj`, `gen.mlp`, ...). Attention is one joint attention.
    """

    def __init__(self, config: EmmaConfig, layer_idx: int):
        super().__init__(config.text_config, layer_idx)
        self.decoupled = config.decoupled_modules(layer_idx)
        self.gen = nn.Module()
        for name in self.decoupled:
            *parents, leaf = PART_PATHS[name].split(".")
            container = self.gen
            for parent in parents:
                if not hasattr(container, parent):
                    container.add_module(parent, nn.Module())
                container = getattr(container, parent)
            container.add_module(leaf, copy.deepcopy(self.get_submodule(PART_PATHS[name])))

    def part(self, name: str, x: torch.Tensor, streams: TokenStreams | None) -> torch.Tensor:
        und_module = self.get_submodule(PART_PATHS[name])
        if streams is None or name not in self.decoupled:
            return und_module(x)
        return streams.apply(und_module, self.gen.get_submodule(PART_PATHS[name]), x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | ContextKVView | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        streams: TokenStreams | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cache = one_cache(cache, past_key_values)
        attention = self.self_attn
        residual = hidden_states
        hidden_states = self.part("input_layernorm", hidden_states, streams)
        head_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
        query = self.part("q_norm", self.part("q_proj", hidden_states, streams).view(head_shape), streams)
        key = self.part("k_norm", self.part("k_proj", hidden_states, streams).view(head_shape), streams)
        value = self.part("v_proj", hidden_states, streams).view(head_shape)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, attention.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            attention.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else attention.attention_dropout,
            scaling=attention.scaling,
            sliding_window=attention.sliding_window,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        hidden_states = residual + self.part("o_proj", attn_output, streams)
        residual = hidden_states
        hidden_states = self.part("post_attention_layernorm", hidden_states, streams)
        return residual + self.part("mlp", hidden_states, streams)


class EmmaLanguageModel(nn.Module):
    """Qwen3's token embeddings, decoder layers and rotary embedding; the final norm has one copy per stream."""

    def __init__(self, config: EmmaConfig):
        super().__init__()
        text_config = config.text_config
        self.config = text_config
        self.embed_tokens = nn.Embedding(text_config.vocab_size, text_config.hidden_size, text_config.pad_token_id)
        self.layers = nn.ModuleList([EmmaDecoderLayer(config, i) for i in range(text_config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.gen_norm = Qwen3RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=text_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        streams: TokenStreams,
        cache: Cache | ContextKVView | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            # Under the installed release's name, so that activation checkpointing drops the cache while training.
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                streams=streams,
                **{CACHE_NAME: cache},
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return streams.apply(self.norm, self.gen_norm, hidden_states), all_hidden_states


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base and models
# ---------------------------------------------------------------------------------------------------------------------


def missing_shards(folder: str) -> list[str]:
    """The weight files that `folder`'s safetensors index lists and the folder lacks."""
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.isfile(index):
        return []
    with open(index, encoding="utf-8") as file:
        shards = sorted(set(json.load(file).get("weight_map", {}).values()))
    return [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]


def check_export_configs(source: str, hub_kwargs: dict) -> None:
    """
    An exported folder holds its config twice, at the root (read by transformers) and in `model/` (read by diffusers
    as the pipeline's component): loading must not depend on which one a loader reads.
    """
    subfolder = hub_kwargs.get("subfolder")
    if not subfolder:
        return
    location = {key: hub_kwargs[key] for key in HUB_KWARGS if key in hub_kwargs}
    paths = [
        cached_file(
            source,
            "config.json",
            subfolder=folder,
            **location,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        for folder in ("", subfolder)
    ]
    if None in paths:
        return
    configs = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            configs.append(json.load(file))
    root, inner = configs
    differing = sorted(key for key in root.keys() | inner.keys() if root.get(key) != inner.get(key))
    if differing:
        raise ValueError(
            f"{source!r}: config.json and {subfolder}/config.json differ in {differing}; an exported folder keeps "
            "them identical (transformers reads the first, diffusers the second), so edit both alike or export again"
        )


def weights_subfolder(source: str, hub_kwargs: dict) -> str:
    """The one subfolder a checkpoint's root weight index points into (an exported EMMA folder's `model`), or ""."""
    index = cached_file(
        source,
        SAFE_WEIGHTS_INDEX_NAME,
        **{key: hub_kwargs[key] for key in HUB_KWARGS if key in hub_kwargs},
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if index is None:
        return ""
    with open(index) as file:
        folders = {os.path.dirname(shard) for shard in json.load(file).get("weight_map", {}).values()}
    return folders.pop() if len(folders) == 1 else ""


def stored_weight_dtypes(source: str, hub_kwargs: dict) -> dict[str, torch.dtype | str]:
    """The safetensors dtype of every stored weight ('F32', 'I32', ...), read from the files' headers alone."""
    location = {key: hub_kwargs[key] for key in (*HUB_KWARGS, "subfolder") if key in hub_kwargs}
    found = {}
    for name in (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME):
        path = cached_file(source, name, **location, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        if name == SAFE_WEIGHTS_INDEX_NAME:
            with open(path) as file:
                shards = sorted(set(json.load(file)["weight_map"].values()))
            files = [os.path.join(os.path.dirname(path), shard) for shard in shards]
        else:
            files = [path]
        for weights_file in files:
            with safe_open(weights_file, framework="pt") as weights:
                found.update({key: weights.get_slice(key).get_dtype() for key in weights.keys()})
        break
    return found


def check_loaded_weights(
    source: str, model: "EmmaPreTrainedModel", loading_info: dict, stored_dtypes: dict[str, torch.dtype | str]
) -> None:
    """
    Raise where loading left the model other than the stored weights describe: tensors it expects and the weights
    lack (they would be randomly initialised), stored tensors it has no place for, integers stored for its floats.
    """
    state = model.state_dict()
    prefix = f"{model.base_model_prefix}."
    integers = []
    for key, dtype in stored_dtypes.items():
        loaded = state.get(key, state.get(key.removeprefix(prefix)))
        stored_is_float = dtype.is_floating_point if isinstance(dtype, torch.dtype) else dtype.startswith(("F", "BF"))
        if loaded is not None and loaded.is_floating_point() and not stored_is_float:
            integers.append(f"{key} ({dtype})")
    problems = {
        "missing (would be randomly initialised)": sorted(loading_info["missing_keys"]),
        "not in the model (would be dropped)": sorted(loading_info["unexpected_keys"]),
        "stored as integers where the model holds floating point": sorted(integers),
    }
    found = [
        f"{len(keys)} {kind}: {keys[:6]}{' ...' if len(keys) > 6 else ''}" for kind, keys in problems.items() if keys
    ]
    if found:
        raise ValueError(
            f"{source}: the weights do not fit the model its config describes; {'; '.join(found)}. The weights and "
            "config.json come from different models (other layer counts or sizes) or the checkpoint is damaged; "
            "pass strict=False to load anyway, as transformers does, with its load report"
        )


class EmmaPreTrainedModel(PreTrainedModel):
    config: EmmaConfig
    config_class = EmmaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "EmmaDecoderLayer",
        "EmmaVisionEmbeddings",
        "Siglip2EncoderLayer",
        "EmmaVisionMoeEncoderLayer",
        "AutoencoderDC",
    ]
    # Quantisation (bitsandbytes, torchao, quanto) leaves these in the loading dtype and float16 loading keeps them in
    # float32: the image encoders, the adapters, the timestep embedding and the velocity head are small, and
    # quantising them costs image quality (and 4-bit CPU kernels refuse their input sizes). Each is named with and
    # without the `model.` prefix, since transformers matches module paths from their start.
    _keep_in_fp32_modules = [
        prefix + name
        for name in ("vision_tower", "vae", "und_adapter", "gen_adapter", "time_embed", "velocity_head")
        for prefix in ("", "model.")
    ]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = False
    # The one-token decode step (a cache, no new images) runs no check on tensor values and no data-dependent branch:
    # with a static cache, generate() compiles it as one graph (`tests/test_fast_decoding.py`).
    _can_compile_fullgraph = True
    # The loss is a mean over the batch's tokens and images; the Trainer then averages over accumulation steps.
    accepts_loss_kwargs = False
    # EMMA's attention mixes causal text with bidirectional image blocks through an explicit mask (a `BlockMask` for
    # flex attention); flash attention's varlen kernels take causal-or-not per sequence, not this mix.
    supported_attention_implementations = ("eager", "sdpa", "flex_attention")

    def __init__(self, config: EmmaConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # The decoder and the vision tower are built from plain modules, so their configs inherit the choice here.
        for sub_config in (config.text_config, config.vision_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation = config._attn_implementation
        self.keep_vision_tower_off_flex()

    def keep_vision_tower_off_flex(self) -> None:
        """
        The vision tower's mask is padding alone, which sdpa runs as fast; flex would compile a kernel per image size
        (through a `create_block_mask` flag torch deprecates), so under flex attention the vision tower runs sdpa.
        """
        if self.config.vision_config._attn_implementation == "flex_attention":
            self.config.vision_config._attn_implementation = "sdpa"

    def check_attention_implementation(self, requested: str | dict | None) -> None:
        """Refuse, by name, implementations that cannot run EMMA's mask (a dict maps sub-configs to requests)."""
        if isinstance(requested, dict):
            for value in requested.values():
                self.check_attention_implementation(value)
        elif requested is not None and requested not in self.supported_attention_implementations:
            raise ValueError(
                f"attn_implementation={requested!r} is not supported by EMMA: its attention mixes causal text with "
                "bidirectional image blocks through an explicit mask, which runs on "
                f"{list(self.supported_attention_implementations)} (default 'sdpa')"
            )

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        self.check_attention_implementation(requested_attention)
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs) -> None:
        self.check_attention_implementation(attn_implementation)
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.keep_vision_tower_off_flex()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args,
        use_safetensors: bool | None = None,
        strict: bool = True,
        **kwargs,
    ):
        """
        `PreTrainedModel.from_pretrained`, reading weights from safetensors only unless `use_safetensors=False`: a
        pickle checkpoint (`pytorch_model.bin`) can run code while it is read, so opening one is the caller's explicit
        choice. Missing, extra, integer-for-float, damaged and wrong-shaped weights raise errors that name the folder
        and the tensors (a config over weights of another model: other layer counts, sizes); `strict=False` loads
        such weights anyway, as transformers does, with its load report. `from_pretrained(None, config=config,
        state_dict=weights)` builds the model from weights in memory.
        """
        if not strict:
            return super().from_pretrained(
                pretrained_model_name_or_path, *args, use_safetensors=use_safetensors, **kwargs
            )
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = cls.load_checked(
            pretrained_model_name_or_path, *args, use_safetensors=use_safetensors, **kwargs
        )
        return (model, loading_info) if wants_loading_info else model

    @classmethod
    def load_checked(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, use_safetensors, **kwargs):
        """`from_pretrained` with its loading info, raising where the stored weights do not fill the model exactly."""
        if pretrained_model_name_or_path is None:
            if kwargs.get("config") is None or kwargs.get("state_dict") is None:
                raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=, or pass a folder")
            loaded = super().from_pretrained(
                None, *args, use_safetensors=use_safetensors, output_loading_info=True, **kwargs
            )
            stored_dtypes = {key: tensor.dtype for key, tensor in kwargs["state_dict"].items()}
            check_loaded_weights("the state_dict", *loaded, stored_dtypes)
            return loaded
        source = os.fspath(pretrained_model_name_or_path)
        looks_like_a_path = os.path.isabs(source) or source.startswith(".") or source.count("/") > 1
        if looks_like_a_path and not os.path.isdir(source):
            raise OSError(f"no folder {source!r}; pass an exported EMMA folder or a Hub model id ('namespace/name')")
        try:
            if not kwargs.get("subfolder"):  # Auto classes pass subfolder="" when the caller gave none
                # An exported folder keeps its weights under `model/` and indexes them from the root; transformers
                # resolves some index paths (disk offload) from the shards' folder, so load from where they are.
                kwargs["subfolder"] = weights_subfolder(source, kwargs)
            check_export_configs(source, kwargs)
            loaded = super().from_pretrained(
                source, *args, use_safetensors=use_safetensors is not False, output_loading_info=True, **kwargs
            )
        except json.JSONDecodeError as error:
            raise clearer_load_error(source, kwargs.get("subfolder"), error) from error
        except SafetensorError as error:
            raise OSError(
                f"{source!r}: a safetensors weights file is damaged or truncated ({error}); save or download it again"
            ) from error
        except OSError as error:
            if not os.path.isdir(source):
                raise clearer_load_error(source, None, error) from error
            if use_safetensors is False or "safetensors" not in str(error):
                raise
            folder = os.path.join(source, kwargs.get("subfolder") or "")
            missing = missing_shards(folder) or missing_shards(source)
            if missing:
                raise OSError(
                    f"{source!r}: the weight files {missing} that its index lists are missing; save or download the "
                    "checkpoint again"
                ) from error
            pickles = (
                sorted(name for name in os.listdir(folder) if name.endswith(".bin")) if os.path.isdir(folder) else []
            )
            found = f"; it holds the pickle files {pickles}" if pickles else ""
            raise OSError(
                f"{source!r} has no safetensors weights (model.safetensors, or shards listed in "
                f"model.safetensors.index.json){found}. EMMA reads weights from safetensors only: a pickle checkpoint "
                "can run code while it is read, so load one only from a source you trust, with use_safetensors=False"
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            reload = {**kwargs, "ignore_mismatched_sizes": True, "output_loading_info": True}
            _, info = super().from_pretrained(source, *args, use_safetensors=use_safetensors is not False, **reload)
            shapes = [
                f"{key} {tuple(saved)} (the config gives {tuple(expected)})"
                for key, saved, expected in sorted(info["mismatched_keys"])
            ]
            raise ValueError(
                f"{source!r} holds tensors whose shapes do not match its config: {'; '.join(shapes)}. The weights "
                "and config.json come from different models; pass ignore_mismatched_sizes=True to re-initialise these"
            ) from error
        check_loaded_weights(repr(source), *loaded, stored_weight_dtypes(source, kwargs))
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """
        `PreTrainedModel.save_pretrained`, written into a staging folder and moved in file by file, index last:
        saving over an earlier save never leaves its weight files next to the new ones (a single file next to new
        shards, or the reverse, would load the old weights), and a crash while writing leaves the earlier files whole.
        """
        save_directory = os.fspath(save_directory)
        check_not_an_export(save_directory, "the model")
        os.makedirs(save_directory, exist_ok=True)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
        variant = re.escape(f".{kwargs['variant']}") if kwargs.get("variant") else ""
        weight_file = re.compile(
            rf"(model|pytorch_model){variant}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)(\.index\.json)?"
        )
        with tempfile.TemporaryDirectory(prefix=".saving-", dir=save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)
            written = sorted(os.listdir(staging), key=lambda name: name.endswith(".index.json"))
            if kwargs.get("is_main_process", True):
                for name in os.listdir(save_directory):
                    if weight_file.fullmatch(name) and name not in written:
                        os.remove(os.path.join(save_directory, name))
            for name in written:
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))

    def adapter_keys(self, keys: set[str], adapter_name: str) -> set[str]:
        """The `keys` naming tensors of adapter `adapter_name`: those a PEFT tuner layer holds under that name."""
        tuner_attributes = {
            attribute
            for module in self.modules()
            for attribute in (*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ()))
        }

        def owned(key: str) -> bool:
            parts = key.split(".")
            return any(name == adapter_name and parent in tuner_attributes for parent, name in zip(parts, parts[1:]))

        return {key for key in keys if owned(key)}

    def load_adapter(self, peft_model_id: str | None = None, *args, use_safetensors: bool | None = None, **kwargs):
        """
        transformers' `load_adapter`, reading `adapter_model.safetensors` only unless `use_safetensors=False`: its
        fallback to `adapter_model.bin` would unpickle (see [`from_pretrained`]). Its load report lists as missing
        only the new adapter's own tensors: transformers matches the adapter's name anywhere in a key (5.23: as a
        substring), so other adapters' weights, or EMMA's `gen` stream for an adapter named "gen", were reported.
        """
        if peft_model_id is not None and use_safetensors is not False and kwargs.get("adapter_state_dict") is None:
            download = {**kwargs, **(kwargs.get("adapter_kwargs") or {})}
            found = cached_file(
                peft_model_id,
                "adapter_model.safetensors",
                _raise_exceptions_for_missing_entries=False,
                **{
                    k: download[k]
                    for k in ("subfolder", "revision", "token", "cache_dir", "local_files_only")
                    if k in download
                },
            )
            if found is None:
                raise OSError(
                    f"{peft_model_id!r} has no adapter_model.safetensors. EMMA reads adapters from safetensors only: "
                    "a pickle adapter (adapter_model.bin) can run code while it is read, so load one only from a "
                    "source you trust, with use_safetensors=False"
                )
        if use_safetensors is not None:
            kwargs["use_safetensors"] = use_safetensors
        peft_logger = transformers_logging.get_logger("transformers.integrations.peft")
        level = peft_logger.level
        peft_logger.setLevel(transformers_logging.ERROR)
        try:
            loading_info = super().load_adapter(peft_model_id, *args, **kwargs)
        finally:
            peft_logger.setLevel(level)
        if loading_info is not None:
            adapter_name = (args[0] if args else kwargs.get("adapter_name")) or "default"
            loading_info.missing_keys = self.adapter_keys(loading_info.missing_keys, adapter_name)
            log_state_dict_report(
                model=self,
                pretrained_model_name_or_path=peft_model_id,
                ignore_mismatched_sizes=False,
                loading_info=loading_info,
                logger=peft_logger,
            )
        return loading_info


class EmmaModel(EmmaPreTrainedModel):
    """The EMMA backbone: both image encoders, the adapters and the shared-and-decoupled decoder, without heads."""

    # Exported checkpoints hold the full model; the backbone leaves its heads out by design, not by accident.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^velocity_head\."]

    def __init__(self, config: EmmaConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        latent_channels = config.vae_config["latent_channels"]
        unshuffled = config.vision_config.hidden_size * config.vision_unshuffle_factor**2
        self.vision_tower = EmmaVisionTower(config)
        self.vae = AutoencoderDC(**config.vae_config)
        self.vae.requires_grad_(False)
        self.und_adapter = EmmaMLP(unshuffled + latent_channels, config.und_adapter_hidden_size, hidden_size)
        self.gen_adapter = EmmaMLP(latent_channels, config.gen_adapter_hidden_size, hidden_size)
        self.time_embed = EmmaTimestepEmbedding(config.timestep_embedding_dim, hidden_size)
        self.language_model = EmmaLanguageModel(config)
        # A training stage's routing (`emma_hf.training.apply_stage`): used in training mode only and never saved,
        # so a checkpoint always infers with `config.vision_router_mode`.
        self.training_router_mode: str | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    @property
    def router_mode(self) -> str:
        """The vision router mode of the next forward: the stage's while training, else the checkpoint's."""
        if self.training and self.training_router_mode is not None:
            return self.training_router_mode
        return self.config.vision_router_mode

    @torch.no_grad()
    def initialize_gen_stream_from_und(self) -> None:
        """Copy every `und` part into its `gen` copy, as when EMMA is built from a plain Qwen3 checkpoint."""
        for layer in self.language_model.layers:
            for name in layer.decoupled:
                path = PART_PATHS[name]
                layer.gen.get_submodule(path).load_state_dict(layer.get_submodule(path).state_dict())
        self.language_model.gen_norm.load_state_dict(self.language_model.norm.state_dict())

    @torch.no_grad()
    def initialize_experts_from_versatile(self) -> None:
        """Copy the `versatile` expert (the original SigLIP2 MLP) into every other expert of each MoE layer."""
        for layer in self.vision_tower.encoder.layers:
            if isinstance(layer, EmmaVisionMoeEncoderLayer):
                for expert in layer.mlp.experts[1:]:
                    expert.load_state_dict(layer.mlp.experts[0].state_dict())

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def check_image_sizes(self, images: list[torch.Tensor], argument: str, cell: int) -> None:
        for image in images:
            height, width = image.shape[-2:]
            if height % cell or width % cell or height == 0 or width == 0:
                raise ValueError(f"{argument} sizes must be positive multiples of {cell}, got {height}x{width}")

    @torch.no_grad()
    def encode_latents(self, vae_pixel_values: ImageInput) -> list[torch.Tensor]:
        """Scaled DC-AE latents `(C, H/32, W/32)` of images in [-1, 1]; the DC-AE is frozen, so no gradient."""
        images = as_image_list(vae_pixel_values, "vae_pixel_values", channels=3)
        self.check_image_sizes(images, "vae_pixel_values", self.config.image_grid_size)
        vae_device, vae_dtype = execution_device(self.vae), compute_dtype(self.vae)
        latents: list[torch.Tensor | None] = [None] * len(images)
        for indices in group_by_size(images).values():
            batch = torch.stack([images[i] for i in indices]).to(device=vae_device, dtype=vae_dtype)
            encoded = self.vae.encode(batch).latent * self.vae.config.scaling_factor
            for i, latent in zip(indices, encoded):
                latents[i] = latent
        return latents

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: ImageInput,
        vae_pixel_values: ImageInput,
        image_grid_hw: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        Context images encoded as transformers' vision-language models do: `last_hidden_state` is SigLIP2's (MoE)
        output `(num_images, patches, hidden)`, right-padded to the largest image; `pooler_output` holds the tokens
        the decoder reads, one `(h*w, hidden)` tensor per image: those features unshuffled to the 32-px grid and
        concatenated on channels with the DC-AE latents, through `und_adapter`, plus 2-D positions.

        pixel_values: images normalised for SigLIP2; vae_pixel_values: the same images in [-1, 1]; packed as the
        processor returns them (with `image_grid_hw`) or unpacked.
        """
        cell = self.config.image_grid_size
        pixel_values, vae_pixel_values = (
            unpack_images(images, image_grid_hw, cell, name)
            for images, name in ((pixel_values, "pixel_values"), (vae_pixel_values, "vae_pixel_values"))
        )
        if pixel_values is None or vae_pixel_values is None:
            raise ValueError("get_image_features needs at least one image in pixel_values and vae_pixel_values")
        images = as_image_list(pixel_values, "pixel_values", channels=self.config.vision_config.num_channels)
        vae_images = as_image_list(vae_pixel_values, "vae_pixel_values", channels=3)
        if [image.shape[-2:] for image in images] != [image.shape[-2:] for image in vae_images]:
            raise ValueError("pixel_values and vae_pixel_values must hold the same images at the same sizes")
        self.check_image_sizes(images, "pixel_values", cell)
        patch_size = self.config.vision_config.patch_size
        tower_device = execution_device(self.vision_tower)
        tower_dtype = compute_dtype(self.vision_tower.embeddings.patch_embedding)
        patches = [patchify(image.to(device=tower_device, dtype=tower_dtype), patch_size) for image in images]
        patch_counts = [p.shape[0] for p in patches]
        padded = torch.zeros(
            len(patches), max(patch_counts), patches[0].shape[-1], dtype=tower_dtype, device=tower_device
        )
        patch_mask = torch.zeros(len(patches), max(patch_counts), dtype=torch.long, device=tower_device)
        for i, p in enumerate(patches):
            padded[i, : p.shape[0]] = p
            patch_mask[i, : p.shape[0]] = 1
        spatial_shapes = torch.tensor(
            [[image.shape[-2] // patch_size, image.shape[-1] // patch_size] for image in images],
            device=tower_device,
        )
        semantic = self.vision_tower(padded, patch_mask, spatial_shapes, self.router_mode)
        latents = self.encode_latents(vae_images)
        factor = self.config.vision_unshuffle_factor
        tokens = []
        for i, latent in enumerate(latents):
            patch_h, patch_w = spatial_shapes[i].tolist()
            grid = semantic[i, : patch_h * patch_w].reshape(patch_h, patch_w, -1).permute(2, 0, 1)
            fused = torch.cat([F.pixel_unshuffle(grid, factor), latent.to(grid.device, grid.dtype)])
            embeds = self.und_adapter(flatten_grid(fused))
            positions = sincos_2d(
                *latent.shape[-2:], embeds.shape[-1], embeds.device, self.config.image_position_scale
            )
            tokens.append(embeds + positions.to(embeds.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=semantic, pooler_output=tokens)

    def embed_noisy_latents(self, noisy_latents: ImageInput, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """Gen tokens, one `(h*w, hidden)` tensor per image: `gen_adapter(x_t)` + 2-D positions + timestep embedding."""
        latents = as_image_list(noisy_latents, "noisy_latents", channels=self.config.vae_config["latent_channels"])
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(len(latents))
        if timesteps.numel() != len(latents):
            raise ValueError(
                f"timesteps must hold one value per generated image ({len(latents)}), got {timesteps.numel()}"
            )
        time_embeds = self.time_embed(timesteps.to(execution_device(self.gen_adapter)))
        tokens = []
        for latent, time_embed in zip(latents, time_embeds):
            embeds = self.gen_adapter(flatten_grid(latent.to(time_embed.device)))
            positions = sincos_2d(
                *latent.shape[-2:], embeds.shape[-1], embeds.device, self.config.image_position_scale
            )
            tokens.append(embeds + positions.to(embeds.dtype) + time_embed)
        return tokens

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: ImageInput | None = None,
        vae_pixel_values: ImageInput | None = None,
        noisy_latents: ImageInput | None = None,
        timesteps: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> EmmaModelOutputWithPast:
        r"""
        input_ids: text with `image_token_id` placeholders for context images and `gen_token_id` placeholders for
            generated images, one run of (H/32)*(W/32) per image, images in order of appearance.
        attention_mask: `(batch, past + seq)`; 0 marks padding, and distinct positive ids mark packed samples
            (1 everywhere is one sample per row).
        pixel_values / vae_pixel_values: the context images, normalised for SigLIP2 and in [-1, 1]: packed as the
            processor returns them (a row per visual token, split by `image_grid_hw`), `(N, C, H, W)`, or a list of
            `(C, H, W)`.
        noisy_latents / timesteps: `x_t` of each generated image (scaled DC-AE latents) and its `t` in [0, 1].
        image_grid_hw: `(num_images, 2)` token grid of each context image, as the processor returns it; splits
            packed images, and is checked against unpacked ones.
        cache: the KV cache to continue from (`past_key_values` is accepted too, as transformers < 5.24 names it).
        """
        cache = one_cache(cache, past_key_values)
        pixel_values, vae_pixel_values = (
            unpack_images(images, image_grid_hw, self.config.image_grid_size, name)
            for images, name in ((pixel_values, "pixel_values"), (vae_pixel_values, "vae_pixel_values"))
        )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_attentions:
            raise ValueError("output_attentions is not supported: EMMA's attention runs through fused kernels")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_size = self.config.text_config.hidden_size
        if inputs_embeds is not None and (
            inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size or not inputs_embeds.is_floating_point()
        ):
            raise ValueError(
                f"inputs_embeds must be floating point (batch, seq, {hidden_size}) (text_config.hidden_size), got "
                f"shape {tuple(inputs_embeds.shape)} ({inputs_embeds.dtype})"
            )
        past_length = cached_length(cache)
        prompt = isinstance(past_length, int) and past_length == 0
        if prompt:
            # Prompts only: continuing from a cache, the inputs are the model's own, and a decode step runs no check
            # on tensor values (no host sync per token, and one graph under `torch.compile(fullgraph=True)`).
            if input_ids is not None:
                check_token_ids(input_ids, self.get_input_embeddings().num_embeddings)
            check_prompt_inputs(attention_mask, {"pixel_values": pixel_values, "vae_pixel_values": vae_pixel_values})
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        token_ids = input_ids if input_ids is not None else self.placeholder_ids(inputs_embeds)
        # Continuing from a cache without new images, a placeholder is a token the model wrote: plain text.
        image_mask, gen_mask, block_ids = find_image_blocks(
            token_ids,
            self.config,
            images=prompt or pixel_values is not None,
            gen=prompt or noisy_latents is not None,
        )
        has_gen = noisy_latents is not None and bool(gen_mask.any())
        if use_cache is None:
            # The Trainer switches caching off in the top-level config (`TrainingArguments.use_cache`); a training
            # pass (gradients on) never continues from its cache, so it keeps none, whoever runs it.
            use_cache = (
                getattr(self.config, "use_cache", self.config.text_config.use_cache)
                and not has_gen
                and not (self.training and torch.is_grad_enabled())
            )
        if use_cache and has_gen:
            raise ValueError(
                "use_cache=True cannot cache noisy gen tokens; encode the prompt with encode_context() and run "
                "predict_velocity() for each step"
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        cache = cache if use_cache or not prompt else None
        # Keys are the cache's slots: past + seq, or all of a static cache's room.
        num_keys = cache.get_mask_sizes(seq, 0)[0] if cache is not None else seq
        key_segment_ids = key_segments(attention_mask, batch, num_keys, past_length, seq, device)

        if image_grid_hw is not None and pixel_values is not None:
            check_image_grid(pixel_values, image_grid_hw, self.config.image_grid_size)
        if prompt or pixel_values is not None or noisy_latents is not None:
            inputs_embeds = self.scatter_visual_tokens(
                inputs_embeds,
                token_ids,
                image_mask,
                gen_mask,
                pixel_values,
                vae_pixel_values,
                noisy_latents,
                timesteps,
            )

        layout = KeyLayout.build(gen_mask, block_ids, key_segment_ids, past_length)
        if position_ids is None:
            if not prompt:
                raise ValueError("position_ids are required when continuing from a cache (generate() passes them)")
            position_ids = rope_position_ids(layout.query_segments, advances_position(block_ids))

        implementation = self.config.text_config._attn_implementation
        # A prompt of plain text that fills its keys exactly is sdpa's own causal case: no mask to build.
        plain_causal = (
            prompt
            and implementation == "sdpa"
            and num_keys == seq
            and not bool((block_ids >= 0).any())
            and bool((key_segment_ids == 1).all())
        )
        mask = None if plain_causal else to_attention_implementation(layout, implementation, inputs_embeds.dtype)

        hidden_states, all_hidden_states = self.language_model(
            inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            streams=TokenStreams(gen_mask if has_gen else None),
            cache=cache,
            output_hidden_states=bool(output_hidden_states),
        )
        return EmmaModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            gen_mask=gen_mask,
            **{CACHE_NAME: cache if use_cache else None},
        )

    def placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """
        `(batch, seq)` ids standing in for `input_ids` when only `inputs_embeds` are given: an image placeholder's id
        where an embedding equals that token's row of the table (as transformers' vision-language models find their
        image tokens), -1 (text) elsewhere.
        """
        table = self.get_input_embeddings().weight
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        for token_id in (self.config.image_token_id, self.config.gen_token_id):
            matches = (inputs_embeds == table[token_id].to(inputs_embeds)).all(-1)
            ids = ids.masked_fill(matches, token_id)
        return ids

    def scatter_visual_tokens(
        self,
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor,
        gen_mask: torch.Tensor,
        pixel_values: ImageInput | None,
        vae_pixel_values: ImageInput | None,
        noisy_latents: ImageInput | None,
        timesteps: torch.Tensor | None,
    ) -> torch.Tensor:
        """Put context-image and gen tokens in place of their placeholders, after checking that they match."""
        if (pixel_values is None) != (vae_pixel_values is None):
            raise ValueError(
                "context images need both pixel_values (SigLIP2-normalised) and vae_pixel_values ([-1, 1])"
            )
        if (noisy_latents is None) != (timesteps is None):
            raise ValueError("noisy_latents and timesteps go together: one t per generated image")
        for mask, images, argument, token_id in (
            (image_mask, pixel_values, "pixel_values", self.config.image_token_id),
            (gen_mask, noisy_latents, "noisy_latents", self.config.gen_token_id),
        ):
            if images is None:
                if bool(mask.any()):
                    raise ValueError(
                        f"input_ids hold {int(mask.sum())} placeholders (id {token_id}) but {argument} is None"
                    )
                continue
            # Counted from the shapes, so a mismatch is reported before either encoder runs.
            if argument == "pixel_values":
                cell = self.config.image_grid_size
                context_images = as_image_list(pixel_values, argument, self.config.vision_config.num_channels)
                self.check_image_sizes(context_images, argument, cell)
                counts = [(image.shape[-2] // cell) * (image.shape[-1] // cell) for image in context_images]
            else:
                latents = as_image_list(noisy_latents, argument, self.config.vae_config["latent_channels"])
                counts = [latent.shape[-2] * latent.shape[-1] for latent in latents]
            check_image_runs(input_ids, token_id, counts, argument)
            if argument == "pixel_values":
                tokens = self.get_image_features(pixel_values, vae_pixel_values, return_dict=True).pooler_output
            else:
                tokens = self.embed_noisy_latents(noisy_latents, timesteps)
            flat = torch.cat(tokens).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None].to(inputs_embeds.device), flat)
        return inputs_embeds


def sample_flow_timesteps(
    config: EmmaConfig, image_token_counts: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training `t` per image: diffusers' density sampling (logit-normal by default), then the resolution shift."""
    u = compute_density_for_timestep_sampling(
        config.flow_weighting_scheme,
        len(image_token_counts),
        logit_mean=config.flow_logit_mean,
        logit_std=config.flow_logit_std,
        generator=generator,
    )
    shift = torch.tensor([config.flow_shift_for(count) for count in image_token_counts])
    return shift * u / (1 + (shift - 1) * u)


class TextDrafts:
    """
    A transformers candidate generator whose drafts end before the first image placeholder or image opening: a
    drafted placeholder (prompt lookup copies the prompt's) would be read as an image slot in the pass that verifies
    the draft together with the prompt. The model itself still writes any token it predicts.
    """

    def __init__(self, generator, stop_token_ids: list[int]):
        self.generator = generator
        self.stop_token_ids = torch.tensor(stop_token_ids)

    def __getattr__(self, name: str):
        if name == "generator":
            raise AttributeError(name)
        return getattr(self.generator, name)

    def get_candidates(self, input_ids: torch.LongTensor, *args, **kwargs):
        candidates, logits = self.generator.get_candidates(input_ids, *args, **kwargs)
        drafted = candidates[:, input_ids.shape[1] :]
        visual = torch.isin(drafted, self.stop_token_ids.to(drafted.device)).any(dim=0)
        if visual.any():
            kept = int(visual.int().argmax())
            candidates = candidates[:, : input_ids.shape[1] + kept]
            logits = None if logits is None else logits[:, :kept]
        return candidates, logits


class EmmaForConditionalGeneration(EmmaPreTrainedModel, GenerationMixin):
    """EMMA with `lm_head` (chat, understanding) and `velocity_head` (text-to-image, editing)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: EmmaConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.model = EmmaModel(config)
        self.lm_head = nn.Linear(hidden_size, config.text_config.vocab_size, bias=False)
        self.velocity_head = EmmaMLP(
            hidden_size, config.velocity_head_hidden_size, config.vae_config["latent_channels"]
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_image_features(
        self, pixel_values: ImageInput, vae_pixel_values: ImageInput, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """[`EmmaModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, vae_pixel_values, **kwargs)

    @property
    def vae(self) -> AutoencoderDC:
        return self.model.vae

    def sample_timesteps(
        self, image_token_counts: Sequence[int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training `t` per image: see [`sample_flow_timesteps`]."""
        return sample_flow_timesteps(self.config, image_token_counts, generator)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: ImageInput | None = None,
        vae_pixel_values: ImageInput | None = None,
        target_pixel_values: ImageInput | None = None,
        target_latents: ImageInput | None = None,
        noise: ImageInput | None = None,
        timesteps: torch.Tensor | None = None,
        noisy_latents: ImageInput | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> EmmaCausalLMOutputWithPast:
        r"""
        Arguments of [`EmmaModel.forward`], plus:

        target_pixel_values / target_latents: the clean images to generate (in [-1, 1]) or their scaled DC-AE
            latents `x0`; with them the flow-matching loss is computed on `x_t = (1 - t) x0 + t noise` against
            `noise - x0`. `noise` (default Gaussian) and `timesteps` (default [`sample_timesteps`]) may be given.
        noisy_latents: `x_t` given directly (with `timesteps`), to predict velocity without a loss.
        labels: next-token targets, -100 to ignore; positions whose label is an image placeholder are ignored too.
        shift_labels: the targets already shifted by one (as the Trainer passes them under context parallelism);
            used instead of shifting `labels`.
        """
        cache = one_cache(cache, past_key_values)
        if sum(x is not None for x in (target_pixel_values, target_latents, noisy_latents)) > 1:
            raise ValueError("pass only one of target_pixel_values, target_latents or noisy_latents")
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)} (-100 where no loss is wanted), "
                f"got {tuple(labels.shape)}"
            )
        velocity_target = None
        if target_pixel_values is not None:
            target_latents = self.model.encode_latents(target_pixel_values)
        if target_latents is not None:
            clean = as_image_list(target_latents, "target_latents", channels=self.config.vae_config["latent_channels"])
            if noise is None:
                noise = [torch.randn_like(latent) for latent in clean]
            noise = as_image_list(noise, "noise")
            if [n.shape for n in noise] != [c.shape for c in clean]:
                raise ValueError("noise must match the target latents' shapes")
            if timesteps is None:
                timesteps = self.sample_timesteps([c.shape[-2] * c.shape[-1] for c in clean]).to(clean[0].device)
            timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
            if timesteps.numel() != len(clean):
                raise ValueError(
                    f"timesteps must hold one value per target image ({len(clean)}), got {timesteps.numel()}"
                )
            noisy_latents = [
                (1 - t) * x0 + t * eps.to(x0) for x0, eps, t in zip(clean, noise, timesteps.to(clean[0].device))
            ]
            velocity_target = torch.cat([flatten_grid(eps.to(x0) - x0) for x0, eps in zip(clean, noise)])

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            vae_pixel_values=vae_pixel_values,
            noisy_latents=noisy_latents,
            timesteps=timesteps,
            image_grid_hw=image_grid_hw,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        velocity = None
        if noisy_latents is not None:
            velocity = self.velocity_head(hidden_states[outputs.gen_mask])

        ce_loss = fm_loss = None
        if labels is not None or shift_labels is not None:
            ce_loss = self.loss_function(
                logits=logits,
                labels=self.without_placeholders(labels),
                shift_labels=self.without_placeholders(shift_labels),
                vocab_size=self.config.text_config.vocab_size,
            )
        if velocity_target is not None:
            fm_loss = F.mse_loss(velocity.float(), velocity_target.to(velocity.device).float())
        terms = [(self.config.ce_weight, ce_loss), (self.config.fm_weight, fm_loss)]
        present = [weight * value for weight, value in terms if value is not None]
        loss = sum(present[1:], present[0]) if present else None
        return EmmaCausalLMOutputWithPast(
            loss=loss,
            ce_loss=ce_loss,
            fm_loss=fm_loss,
            logits=logits,
            velocity=velocity,
            hidden_states=outputs.hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def without_placeholders(self, labels: torch.LongTensor | None) -> torch.LongTensor | None:
        """Labels with image placeholders ignored: image tokens are learnt by the flow-matching loss."""
        if labels is None:
            return None
        placeholder = (labels == self.config.image_token_id) | (labels == self.config.gen_token_id)
        return labels.masked_fill(placeholder, -100)

    @torch.no_grad()
    def encode_context(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: ImageInput | None = None,
        vae_pixel_values: ImageInput | None = None,
        image_grid_hw: torch.LongTensor | None = None,
    ) -> EmmaContext:
        """
        Encode a prompt (text and context images, ending where the generated image starts) into a KV cache once,
        for [`predict_velocity`] to run each denoising step on the gen tokens alone.
        """
        if bool((input_ids == self.config.gen_token_id).any()):
            raise ValueError("input_ids of a context must not hold gen placeholders: gen tokens are added per step")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_token_ids(input_ids, self.get_input_embeddings().num_embeddings)
        position_ids = emma_position_ids(input_ids, attention_mask, self.config)
        check_position_budget(position_ids, 1, self.config, "the prompt with its generated image")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            vae_pixel_values=vae_pixel_values,
            image_grid_hw=image_grid_hw,
            use_cache=True,
            return_dict=True,
        )
        return EmmaContext(
            cache=getattr(outputs, CACHE_NAME),
            attention_mask=attention_mask,
            next_position_ids=position_ids.max(-1).values + 1,
        )

    def predict_velocity(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor | float, context: EmmaContext
    ) -> torch.Tensor:
        """
        Velocity `v = noise - x0` predicted for `noisy_latents` `(batch, C, h, w)` at `t` in [0, 1] (one per row or
        one for all), attending to `context`. Equal to the full-sequence forward over context + gen tokens.
        """
        if not isinstance(noisy_latents, torch.Tensor) or noisy_latents.ndim != 4:
            raise ValueError("noisy_latents must be a (batch, channels, height, width) tensor")
        batch, channels, height, width = noisy_latents.shape
        if batch != context.batch_size:
            raise ValueError(f"noisy_latents has batch {batch} but the context was encoded for {context.batch_size}")
        num_tokens = height * width
        gen_embeds = torch.stack(self.model.embed_noisy_latents(noisy_latents, torch.as_tensor(timesteps)))
        gen_embeds = gen_embeds.to(compute_dtype(self.get_input_embeddings()))
        device = gen_embeds.device
        implementation = self.config.text_config._attn_implementation
        mask_key = (num_tokens, implementation, gen_embeds.dtype, device)
        if mask_key not in context.step_masks:
            # One gen block per row, seeing every context token (packed ids do not matter here) and itself.
            context_keys = (context.attention_mask.to(device) != 0).long()
            gen_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
            layout = KeyLayout.build(
                gen_mask,
                torch.zeros(batch, num_tokens, dtype=torch.long, device=device),
                torch.cat([context_keys, gen_mask.long()], dim=1),
                context_keys.shape[1],
            )
            context.step_masks[mask_key] = to_attention_implementation(layout, implementation, gen_embeds.dtype)
        mask = context.step_masks[mask_key]
        position_ids = context.next_position_ids.to(device)[:, None].expand(batch, num_tokens)
        hidden_states, _ = self.model.language_model(
            gen_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            streams=TokenStreams.only_gen(),
            cache=ContextKVView(context.cache),
        )
        velocity = self.velocity_head(hidden_states)
        return velocity.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    def create_masks_for_generate(
        self,
        config: EmmaConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor | None:
        """
        What generate() hands `forward` as the mask when the cache is static (transformers builds 4-D masks there):
        EMMA's own 2-D segment ids, padded with 0 to the cache's room, so that every decode step has one shape and
        compiles once. `forward` builds the attention mask from them.
        """
        cache = one_cache(cache, past_key_values)
        if attention_mask is None or cache is None:
            return attention_mask
        num_keys = cache.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
        return F.pad(attention_mask, (0, num_keys - attention_mask.shape[1]))

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        if inputs_tensor.ndim == 3:  # inputs_embeds: placeholders are where they equal their token's embedding
            token_ids = self.model.placeholder_ids(inputs_tensor)
        elif inputs_tensor.ndim == 2:
            check_token_ids(inputs_tensor, self.get_input_embeddings().num_embeddings)
            token_ids = inputs_tensor
        else:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        position_ids = emma_position_ids(token_ids, model_kwargs.get("attention_mask"), self.config)
        check_position_budget(position_ids, 0, self.config, "the prompt")
        return position_ids

    def prepare_inputs_for_generation(
        self,
        *args,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """
        The images go with the pass that fills an empty cache: the prompt's, also where transformers does not flag it
        as the first iteration (a draft model's prefill in assisted decoding); later passes read them from the cache.
        """
        model_inputs = super().prepare_inputs_for_generation(
            *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        cache = kwargs.get(CACHE_NAME)
        prefill = is_first_iteration or cache is None or cache.get_seq_length() == 0
        for name in CONTEXT_IMAGE_INPUTS:
            if prefill and name in kwargs:
                model_inputs[name] = kwargs[name]
            elif not prefill and kwargs.get("use_cache", True):
                model_inputs.pop(name, None)
        return model_inputs

    def _get_candidate_generator(self, *args, **kwargs):
        """Drafts of assisted and prompt-lookup decoding, cut before any image token (see `TextDrafts`)."""
        visual_ids = [self.config.image_token_id, self.config.gen_token_id, self.config.vision_start_token_id]
        return TextDrafts(super()._get_candidate_generator(*args, **kwargs), visual_ids)

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        """Repeat each row's own images with the row (`num_return_sequences`, beams): images are not batched by row."""
        images = {name: kwargs.pop(name) for name in CONTEXT_IMAGE_INPUTS if kwargs.get(name) is not None}
        for name in ("pixel_values", "vae_pixel_values"):
            if name in images:
                images[name] = unpack_images(
                    images[name], images.get("image_grid_hw"), self.config.image_grid_size, name
                )
        # Rows without images (the processor's empty inputs) have nothing to repeat.
        images = {name: value for name, value in images.items() if value is not None and len(value)}
        token_ids = input_ids
        if (input_ids is None or input_ids.shape[1] == 0) and kwargs.get("inputs_embeds") is not None:
            token_ids = self.model.placeholder_ids(kwargs["inputs_embeds"])
        expanded_ids, kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **kwargs
        )
        if images and expand_size > 1:
            counts = images_per_row(token_ids, self.config)
            starts = [sum(counts[:row]) for row in range(len(counts))]
            order = [
                start + i for start, count in zip(starts, counts) for _ in range(expand_size) for i in range(count)
            ]
            for name, value in images.items():
                picked = [value[i] for i in order]
                images[name] = torch.stack(picked) if isinstance(value, torch.Tensor) else picked
        return expanded_ids, {**kwargs, **images}


__all__ = ["EmmaForConditionalGeneration", "EmmaModel", "EmmaPreTrainedModel", "EmmaContext"]
