# Copyright 2026 The emma_hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of EMMA (arXiv 2512.04810): a Qwen3 decoder, a SigLIP2 encoder with MoE MLPs and a DC-AE."""

import copy
import math
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# Names of the decoder-layer parts that can have one copy per stream (`und` and `gen`).
DECOUPLABLE_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_norm",
    "k_norm",
    "input_layernorm",
    "post_attention_layernorm",
    "mlp",
)
# Auto class -> remote-code class, written into every saved config.json.
AUTO_MAP = {
    "AutoConfig": "configuration_emma.EmmaConfig",
    "AutoModel": "modeling_emma.EmmaModel",
    "AutoModelForImageTextToText": "modeling_emma.EmmaForConditionalGeneration",
    "AutoProcessor": "processing_emma.EmmaProcessor",
}
VISION_ROUTER_MODES = ("top1", "soft", "versatile", "stem")
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "uniform")

# DC-AE f32c32 as released with Sana (mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers).
DC_AE_F32C32_CONFIG = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 3,
    "decoder_act_fns": ["relu"] * 3 + ["silu"] * 3,
    "scaling_factor": 0.41407,
}

PRESETS = {
    "emma-4b": {
        "text_config": {
            "model_type": "qwen3",
            "vocab_size": 151936,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "siglip2_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 16,
            "num_patches": 256,
            "vision_use_head": False,
        },
        "vae_config": DC_AE_F32C32_CONFIG,
        # Qwen3's own <|vision_start|>, <|vision_end|> and <|image_pad|>; the two generation tokens are added after
        # the 151669 tokens of the Qwen3 tokenizer, inside its padded 151936-row embedding.
        "image_token_id": 151655,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "gen_token_id": 151669,
        "gen_start_token_id": 151670,
    },
    "tiny": {
        "text_config": {
            "model_type": "qwen3",
            "vocab_size": 320,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "siglip2_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "patch_size": 16,
            "num_patches": 64,
            "vision_use_head": False,
        },
        "vae_config": {
            "in_channels": 3,
            "latent_channels": 32,
            "attention_head_dim": 8,
            "encoder_block_types": "ResBlock",
            "decoder_block_types": "ResBlock",
            "encoder_block_out_channels": [8, 8, 16, 16, 32, 32],
            "decoder_block_out_channels": [8, 8, 16, 16, 32, 32],
            "encoder_layers_per_block": [1, 1, 1, 1, 1, 1],
            "decoder_layers_per_block": [1, 1, 1, 1, 1, 1],
            "encoder_qkv_multiscales": [[], [], [], [], [], []],
            "decoder_qkv_multiscales": [[], [], [], [], [], []],
            "upsample_block_type": "interpolate",
            "downsample_block_type": "Conv",
            "scaling_factor": 1.0,
        },
        "vision_moe_layers": [1, 2],
        "und_adapter_hidden_size": 128,
        "gen_adapter_hidden_size": 64,
        "velocity_head_hidden_size": 64,
        "timestep_embedding_dim": 32,
        "image_token_id": 310,
        "vision_start_token_id": 311,
        "vision_end_token_id": 312,
        "gen_token_id": 313,
        "gen_start_token_id": 314,
    },
}


def vae_spatial_compression(vae_config: dict) -> int:
    """Downsampling factor of an `AutoencoderDC`, as diffusers computes it."""
    return 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)


@strict
class EmmaConfig(PreTrainedConfig):
    r"""
    Configuration of [`EmmaModel`] and [`EmmaForConditionalGeneration`].

    Args:
        text_config (`dict` or `Qwen3Config`): the decoder; every layer gets a second (`gen`) copy of its decoupled parts.
        vision_config (`dict` or `Siglip2VisionConfig`): the understanding encoder (SigLIP2, NaFlex patches).
        vae_config (`dict`): keyword arguments of diffusers' `AutoencoderDC`, the frozen generation encoder/decoder.
        num_shallow_layers (`int`, *optional*): layers `[0, num_shallow_layers)` share all weights except
            `shallow_decoupled_modules`; deeper layers have a full copy per stream. Defaults to half the layers.
        shallow_decoupled_modules (`list[str]`): parts with one copy per stream in shallow layers.
        vision_moe_layers (`list[int]`, *optional*): SigLIP2 layers whose MLP becomes a mixture of experts.
            Defaults to the last five layers (or all, for shorter encoders).
        vision_num_experts (`int`): experts per MoE layer; expert 0 is `versatile`, expert 1 is `stem`.
        vision_router_mode (`str`): `top1` (hard choice per image), `soft` (weighted sum, to train the router), or
            `versatile` / `stem` to force one expert.
        vision_unshuffle_factor (`int`): pixel-unshuffle of SigLIP2 patches; `patch_size * factor` must equal the
            DC-AE downsampling so both encoders give one token per image cell.
        und_adapter_hidden_size / gen_adapter_hidden_size / velocity_head_hidden_size (`int`, *optional*): widths
            of the MLPs; default to the decoder's hidden size.
        timestep_embedding_dim (`int`): sinusoidal channels of the timestep before its MLP.
        image_position_scale (`float`): cell coordinates are multiplied by this before the 2-D sin-cos embeddings.
            At 1 a grid of a few cells varies only the fastest frequencies, a weak signal next to the tokens'
            content; small-canvas models spread their positions over more frequencies with a larger value.
        image_token_id / gen_token_id (`int`): placeholders of context-image and generated-image tokens.
        vision_start_token_id / vision_end_token_id / gen_start_token_id (`int`): delimiters written by the processor.
        flow_*: flow-matching defaults; t ~ logit-normal(`flow_logit_mean`, `flow_logit_std`), then shifted by
            `exp(mu)` where `mu` grows linearly with the image's token count from `flow_base_shift` at
            `flow_base_image_seq_len` to `flow_max_shift` at `flow_max_image_seq_len` (the schedule of diffusers'
            `FlowMatchEulerDiscreteScheduler` with dynamic shifting); `flow_shift` replaces it when
            `flow_use_dynamic_shifting` is False.
        ce_weight / fm_weight (`float`): loss = ce_weight * cross-entropy + fm_weight * flow-matching MSE.
    """

    model_type = "emma"
    sub_configs_defaults: ClassVar = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip2_vision_model", init_kwargs={"vision_use_head": False}
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None

    num_shallow_layers: int | None = None
    shallow_decoupled_modules: list[str] | tuple[str, ...] = ("v_proj",)
    vision_moe_layers: list[int] | tuple[int, ...] | None = None
    vision_num_experts: int = 2
    vision_router_mode: str = "top1"
    vision_unshuffle_factor: int = 2

    und_adapter_hidden_size: int | None = None
    gen_adapter_hidden_size: int | None = None
    velocity_head_hidden_size: int | None = None
    timestep_embedding_dim: int = 256
    image_position_scale: float = 1.0

    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    gen_token_id: int = 151669
    gen_start_token_id: int = 151670

    flow_use_dynamic_shifting: bool = True
    flow_shift: float = 3.0
    flow_base_shift: float = 0.5
    flow_max_shift: float = 1.15
    flow_base_image_seq_len: int = 256
    flow_max_image_seq_len: int = 4096
    flow_weighting_scheme: str = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    ce_weight: float = 1.0
    fm_weight: float = 1.0

    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        if self.vae_config is None:
            self.vae_config = copy.deepcopy(DC_AE_F32C32_CONFIG)
        self.vae_config = {key: value for key, value in self.vae_config.items() if not key.startswith("_")}
        num_layers = self.text_config.num_hidden_layers
        if self.num_shallow_layers is None:
            self.num_shallow_layers = num_layers // 2
        num_vision_layers = self.vision_config.num_hidden_layers
        if self.vision_moe_layers is None:
            self.vision_moe_layers = list(range(max(0, num_vision_layers - 5), num_vision_layers))
        self.shallow_decoupled_modules = list(self.shallow_decoupled_modules)
        self.vision_moe_layers = list(self.vision_moe_layers)
        hidden_size = self.text_config.hidden_size
        for name in ("und_adapter_hidden_size", "gen_adapter_hidden_size", "velocity_head_hidden_size"):
            if getattr(self, name) is None:
                setattr(self, name, hidden_size)
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        self.validate_emma()

    def validate_emma(self) -> None:
        """Refuse settings that cannot build a working model, naming the field at fault."""
        num_layers = self.text_config.num_hidden_layers
        if not 0 <= self.num_shallow_layers <= num_layers:
            raise ValueError(
                f"num_shallow_layers must be in [0, {num_layers}] (text_config.num_hidden_layers), "
                f"got {self.num_shallow_layers}"
            )
        unknown = sorted(set(self.shallow_decoupled_modules) - set(DECOUPLABLE_MODULES))
        if unknown:
            raise ValueError(
                f"shallow_decoupled_modules has unknown names {unknown}; allowed: {list(DECOUPLABLE_MODULES)}"
            )
        num_vision_layers = self.vision_config.num_hidden_layers
        bad_layers = [i for i in self.vision_moe_layers if not 0 <= i < num_vision_layers]
        if bad_layers or len(set(self.vision_moe_layers)) != len(self.vision_moe_layers):
            raise ValueError(
                f"vision_moe_layers must be distinct indices in [0, {num_vision_layers}) "
                f"(vision_config.num_hidden_layers), got {self.vision_moe_layers}"
            )
        if self.vision_num_experts < 1:
            raise ValueError(f"vision_num_experts must be >= 1, got {self.vision_num_experts}")
        if self.vision_router_mode not in VISION_ROUTER_MODES:
            raise ValueError(
                f"vision_router_mode must be one of {list(VISION_ROUTER_MODES)}, got {self.vision_router_mode!r}"
            )
        if self.vision_router_mode == "stem" and self.vision_num_experts < 2:
            raise ValueError("vision_router_mode='stem' needs vision_num_experts >= 2")
        patch_size = self.vision_config.patch_size
        if not isinstance(patch_size, int):
            raise ValueError(f"vision_config.patch_size must be one int (square patches), got {patch_size}")
        for key in ("encoder_block_out_channels", "latent_channels"):
            if key not in self.vae_config:
                raise ValueError(
                    f"vae_config needs {key!r} (AutoencoderDC keyword arguments), got {sorted(self.vae_config)}"
                )
        vae_downsampling = vae_spatial_compression(self.vae_config)
        grid = patch_size * self.vision_unshuffle_factor
        if vae_downsampling != grid:
            raise ValueError(
                f"vae_config downsamples by {vae_downsampling} but the understanding encoder's grid is "
                f"vision_config.patch_size * vision_unshuffle_factor = {patch_size} * {self.vision_unshuffle_factor} = "
                f"{grid}; both encoders must give one token per {grid}x{grid} cell"
            )
        if not self.image_position_scale > 0:
            raise ValueError(f"image_position_scale must be a positive number, got {self.image_position_scale}")
        if self.text_config.hidden_size % 4:
            raise ValueError(
                f"text_config.hidden_size must be a multiple of 4 (2-D sin-cos positions), got {self.text_config.hidden_size}"
            )
        for name in (
            "und_adapter_hidden_size",
            "gen_adapter_hidden_size",
            "velocity_head_hidden_size",
            "timestep_embedding_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        token_fields = (
            "image_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "gen_token_id",
            "gen_start_token_id",
        )
        vocab_size = self.text_config.vocab_size
        for name in token_fields:
            if not 0 <= getattr(self, name) < vocab_size:
                raise ValueError(
                    f"{name} must be in [0, {vocab_size}) (text_config.vocab_size), got {getattr(self, name)}"
                )
        if len({getattr(self, name) for name in token_fields}) != len(token_fields):
            raise ValueError(
                f"special token ids must be distinct, got { ({name: getattr(self, name) for name in token_fields}) }"
            )
        if self.flow_weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ValueError(
                f"flow_weighting_scheme must be one of {list(FLOW_WEIGHTING_SCHEMES)}, got {self.flow_weighting_scheme!r}"
            )
        if self.flow_logit_std <= 0:
            raise ValueError(f"flow_logit_std must be > 0, got {self.flow_logit_std}")
        if self.flow_shift <= 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
        if self.flow_max_image_seq_len <= self.flow_base_image_seq_len:
            raise ValueError(
                f"flow_max_image_seq_len ({self.flow_max_image_seq_len}) must exceed flow_base_image_seq_len "
                f"({self.flow_base_image_seq_len})"
            )
        if self.ce_weight < 0 or self.fm_weight < 0:
            raise ValueError(f"ce_weight and fm_weight must be >= 0, got {self.ce_weight} and {self.fm_weight}")

    @property
    def image_grid_size(self) -> int:
        """Side in pixels of the image cell that becomes one token (32 for EMMA)."""
        return self.vision_config.patch_size * self.vision_unshuffle_factor

    def num_image_tokens(self, height: int, width: int) -> int:
        """Tokens of an image of `height` x `width` pixels, the same for context and generated images."""
        grid = self.image_grid_size
        if height % grid or width % grid or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {grid}, got {height}x{width}")
        return (height // grid) * (width // grid)

    def flow_shift_for(self, image_seq_len: int) -> float:
        """Timestep shift for an image of `image_seq_len` tokens: `exp(mu)` with diffusers' linear `mu`, or `flow_shift`."""
        if not self.flow_use_dynamic_shifting:
            return self.flow_shift
        slope = (self.flow_max_shift - self.flow_base_shift) / (
            self.flow_max_image_seq_len - self.flow_base_image_seq_len
        )
        return math.exp(self.flow_base_shift + slope * (image_seq_len - self.flow_base_image_seq_len))

    def decoupled_modules(self, layer_idx: int) -> tuple[str, ...]:
        """Parts of decoder layer `layer_idx` that have one copy per stream."""
        if layer_idx < self.num_shallow_layers:
            return tuple(name for name in DECOUPLABLE_MODULES if name in self.shallow_decoupled_modules)
        return DECOUPLABLE_MODULES

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EmmaConfig":
        """Build a named configuration (`emma-4b`, `tiny`); keyword arguments override its fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


__all__ = ["EmmaConfig"]


# Copyright 2026 The emma_hf authors. Licensed under the Apache License, Version 2.0.
"""
EMMA's processor: one image processor that gives every image to both of EMMA's encoders (SigLIP2 and the DC-AE) at
one size, a multiple of 32 so that each 32x32 cell becomes one visual token, and a text processor that expands each
image placeholder to that many tokens inside a Qwen3 chat.
"""

import math
import os
import urllib.request
from collections.abc import Sequence
from io import BytesIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import AutoImageProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, Unpack



IMAGE_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
GEN_TOKEN = "<|gen_pad|>"
GEN_START_TOKEN = "<|gen_start|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# EmmaConfig field -> token, in the order they are added to a tokenizer that lacks them (Qwen3's tokenizer has the
# three vision tokens; the two gen tokens then land on ids 151669 and 151670, as the emma-4b preset expects).
EMMA_SPECIAL_TOKENS = {
    "image_token_id": IMAGE_TOKEN,
    "vision_start_token_id": VISION_START_TOKEN,
    "vision_end_token_id": VISION_END_TOKEN,
    "gen_token_id": GEN_TOKEN,
    "gen_start_token_id": GEN_START_TOKEN,
}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'text' %}"
    "{{- content['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

VALID_IMAGE_TYPES = "a PIL image, a numpy array, a torch tensor, a file path or an http(s) URL"


def fit_to_token_grid(height: int, width: int, patch_size: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """
    The size an image is resized to: both sides multiples of `patch_size`, area within `[min_pixels, max_pixels]`
    (as far as whole tokens allow), aspect ratio as close to the input's as the token grid can be.
    """
    area = height * width
    scale = 1.0
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    rows = max(1, round(height * scale / patch_size))
    cols = max(1, round(width * scale / patch_size))
    max_tokens = max(1, max_pixels // patch_size**2)
    min_tokens = min(max_tokens, math.ceil(min_pixels / patch_size**2))
    while rows * cols > max_tokens:
        if rows > 1 and (rows * width >= cols * height or cols == 1):
            rows -= 1
        else:
            cols -= 1
    while rows * cols < min_tokens:
        if (rows + 1) * cols <= max_tokens and rows * width <= cols * height:
            rows += 1
        elif rows * (cols + 1) <= max_tokens:
            cols += 1
        else:
            break
    return rows * patch_size, cols * patch_size


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode to RGB: transparency over white, 16-bit greyscale scaled to 8 bits, the rest by PIL."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = PIL.Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def array_to_pil(array: np.ndarray, channels_first: bool) -> PIL.Image.Image:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1, 3, 4; uint8, uint16 or float in [0, 1]."""
    if array.ndim == 3 and channels_first and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"image arrays must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3 or 4; got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image arrays must not be empty; got shape {array.shape}")
    if array.dtype == np.uint8:
        levels = array
    elif array.dtype == np.uint16:
        levels = np.round(array * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("float images must hold finite values in [0, 1]; got NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"float images must hold finite values in [0, 1]; got values in [{low}, {high}]")
        levels = np.round(array * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"image arrays must be uint8, uint16 or floating point in [0, 1]; got dtype {array.dtype}")
    if levels.ndim == 3 and levels.shape[-1] == 1:
        levels = levels[..., 0]
    return to_rgb(PIL.Image.fromarray(np.ascontiguousarray(levels)))


def open_image(source: str | os.PathLike) -> PIL.Image.Image:
    """Open a file path or an http(s) URL, upright as its EXIF orientation says."""
    source = os.fspath(source)
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source) as response:
                image = PIL.Image.open(BytesIO(response.read()))
        elif not os.path.isfile(source):
            raise FileNotFoundError(f"image file not found: {source!r}")
        else:
            image = PIL.Image.open(source)
        image.load()
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{source!r} is not an image file PIL can read") from error
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{source!r} could not be read as an image: {error}") from error
    return PIL.ImageOps.exif_transpose(image)


def load_rgb_image(image) -> PIL.Image.Image:
    """One image of any accepted kind as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError("images must not be empty; got a PIL image of size 0")
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        return array_to_pil(
            image.detach().cpu().float().numpy() if image.is_floating_point() else image.cpu().numpy(), True
        )
    if isinstance(image, np.ndarray):
        return array_to_pil(image, channels_first=False)
    raise TypeError(f"each image must be {VALID_IMAGE_TYPES}; got {type(image).__name__}")


def flatten_images(images) -> list:
    """A single image, a batch tensor `(N, C, H, W)`, or (nested) lists of images -> flat list, in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    return [images]


class EmmaImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    patch_size (`int`, *optional*, defaults to 32):
        Side in pixels of the square that becomes one visual token; output sides are multiples of it.
    """

    patch_size: int


class EmmaImageProcessor(PilBackend):
    r"""
    Resizes each image (aspect kept) so that both sides are multiples of `patch_size` and its area lies within
    `size={"min_pixels", "max_pixels"}` (or to an exact `size={"height", "width"}`), and returns the same resized
    image twice: `pixel_values` normalised for SigLIP2 (`image_mean`/`image_std`) and `vae_pixel_values` in [-1, 1]
    for the DC-AE, plus `image_grid_hw`, the token grid `(H/patch, W/patch)` of each image.

    Accepts PIL images of any mode (transparency is put on white, 16-bit greyscale scaled), numpy arrays
    (`(H, W[, C])`), torch tensors (`(C, H, W)`; a 4-D tensor is a batch), file paths and http(s) URLs; uint8,
    uint16 or float in [0, 1]. Huge images are shrunk to the budget, tiny ones enlarged to it.

    Images of one size come back stacked in one tensor; images of different sizes as a list of `(3, H, W)` tensors,
    which the model accepts as is.
    """

    do_resize = True
    resample = PILImageResampling.BICUBIC
    size = {"min_pixels": 256 * 256, "max_pixels": 1024 * 1024}
    default_to_square = False
    do_rescale = True
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True
    patch_size = 32
    valid_kwargs = EmmaImageProcessorKwargs
    model_input_names = ["pixel_values", "vae_pixel_values", "image_grid_hw"]

    def __init__(self, **kwargs: Unpack[EmmaImageProcessorKwargs]):
        super().__init__(**kwargs)
        self.output_size(64, 64, self.size, self.patch_size)

    def fetch_images(self, image_url_or_urls):
        """Paths and URLs are opened when the images are prepared, so errors name the file."""
        return image_url_or_urls

    def output_size(self, height: int, width: int, size: SizeDict | dict, patch_size: int) -> tuple[int, int]:
        """`(height, width)` an input image of this size is resized to."""
        size = size if isinstance(size, SizeDict) else SizeDict(**size)
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer; got {patch_size!r}")
        if size.height is not None or size.width is not None:
            if not all(isinstance(v, int) and v > 0 and v % patch_size == 0 for v in (size.height, size.width)):
                raise ValueError(
                    f"size height and width must be positive multiples of patch_size={patch_size}; got {dict(size)}"
                )
            return size.height, size.width
        if size.min_pixels is None or size.max_pixels is None:
            raise ValueError(f"size must hold min_pixels and max_pixels, or height and width; got {dict(size)}")
        if not 0 < size.min_pixels <= size.max_pixels or size.max_pixels < patch_size**2:
            raise ValueError(
                f"size needs 0 < min_pixels <= max_pixels and max_pixels >= patch_size**2 ({patch_size**2}); "
                f"got {dict(size)}"
            )
        return fit_to_token_grid(height, width, patch_size, size.min_pixels, size.max_pixels)

    def load_image(self, image) -> PIL.Image.Image:
        """Any accepted input kind as an RGB PIL image, not yet resized."""
        return load_rgb_image(image)

    def resized_size(self, image: PIL.Image.Image) -> tuple[int, int]:
        """`(height, width)` this processor resizes `image` to."""
        return self.output_size(image.height, image.width, self.size, self.patch_size)

    def _validate_preprocess_kwargs(self, **kwargs):
        """The base checks, which do not know `min_pixels`/`max_pixels` sizes, run on everything but `size`."""
        super()._validate_preprocess_kwargs(**{**kwargs, "do_resize": False})

    def _preprocess_image_like_inputs(self, images, *args, **kwargs) -> BatchFeature:
        flat = flatten_images(images)
        if not flat:
            raise ValueError("images must hold at least one image")
        return self._preprocess([load_rgb_image(image) for image in flat], **kwargs)

    def _preprocess(
        self,
        images: list[PIL.Image.Image],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        patch_size: int,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None, None]
        siglip, vae, grids = [], [], []
        for image in images:
            height, width = self.output_size(image.height, image.width, size, patch_size)
            if not do_resize and (height, width) != (image.height, image.width):
                raise ValueError(
                    f"with do_resize=False images must already be multiples of patch_size={patch_size} within the "
                    f"size budget; got {image.height}x{image.width}"
                )
            if (height, width) != (image.height, image.width):
                image = image.resize(
                    (width, height),
                    resample=PILImageResampling(self.resample if resample is None else resample),
                    reducing_gap=3.0,
                )
            unit = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
            siglip.append((unit - mean) / std)
            vae.append(unit * 2.0 - 1.0)
            grids.append((height // patch_size, width // patch_size))
        data = {
            "pixel_values": batch_images(siglip, return_tensors),
            "vae_pixel_values": batch_images(vae, return_tensors),
            "image_grid_hw": np.asarray(grids, dtype=np.int64),
        }
        return BatchFeature(
            data, tensor_type=return_tensors, skip_tensor_conversion=["pixel_values", "vae_pixel_values"]
        )


def batch_images(images: list[np.ndarray], return_tensors: str | None):
    """One stacked array when all images share a size, else a list; torch tensors when `return_tensors="pt"`."""
    same_size = len({image.shape for image in images}) == 1
    if return_tensors == "pt":
        tensors = [torch.from_numpy(image) for image in images]
        return torch.stack(tensors) if same_size else tensors
    if return_tensors == "np" and same_size:
        return np.stack(images)
    return images


class EmmaProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: EmmaImageProcessorKwargs


class EmmaProcessor(ProcessorMixin):
    r"""
    Tokenizer + [`EmmaImageProcessor`] for EMMA. Each `<|image_pad|>` in the text (the chat template writes one per
    image, between `<|vision_start|>` and `<|vision_end|>`) becomes one placeholder per visual token of the next
    image; batches are left-padded for generation. EMMA's special tokens are added to the tokenizer if it lacks them
    ([`emma_token_ids`] gives their ids for the model config).
    """

    valid_processor_kwargs = EmmaProcessorKwargs
    skip_tensor_conversion = ["pixel_values", "vae_pixel_values"]
    text_kwargs = {"padding": True, "padding_side": "left"}

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs):
        registered = tokenizer.get_added_vocab()
        missing = [token for token in (*CHAT_TOKENS, *EMMA_SPECIAL_TOKENS.values()) if token not in registered]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @property
    def emma_token_ids(self) -> dict[str, int]:
        """EmmaConfig field -> id of that token in this tokenizer."""
        return {field: self.tokenizer.convert_tokens_to_ids(token) for field, token in EMMA_SPECIAL_TOKENS.items()}

    @property
    def end_of_turn_token_id(self) -> int:
        """`<|im_end|>`: where an assistant turn, hence chat generation, stops."""
        return self.tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1])

    def generation_prompt(self, prompt: str, with_image: bool = False) -> str:
        """
        Chat text for drawing an image: a user turn (the source image first, for an edit, then the instruction) and
        the assistant's turn opened up to where the generated image's tokens begin.
        """
        content = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        text = self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return text + GEN_START_TOKEN + VISION_START_TOKEN

    def validate_inputs(self, images=None, text=None, **kwargs) -> None:
        """Count images as the image processor will (paths unopened, batch tensors split) against the placeholders."""
        if images is None:
            return super().validate_inputs(images=None, text=text, **kwargs)
        num_images = len(flatten_images(images))
        if text is not None:
            if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
                raise ValueError("text must be a string or a list of strings")
            num_placeholders = sum(
                sample.count(self.image_token) for sample in ([text] if isinstance(text, str) else text)
            )
            if num_placeholders != num_images:
                raise ValueError(
                    f"text holds {num_placeholders} {self.image_token} placeholders but {num_images} images were "
                    "passed; each image needs exactly one placeholder, in order"
                )

    def _process_images(self, images, **kwargs) -> tuple[BatchFeature, list[str]]:
        processed = self.image_processor(images, **kwargs)
        replacements = [self.replace_image_token(processed, index) for index in range(len(processed["image_grid_hw"]))]
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        rows, cols = (int(v) for v in image_inputs["image_grid_hw"][image_idx])
        return self.image_token * (rows * cols)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated token ids (new tokens only, if the prompt was cut off) to text."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


AutoImageProcessor.register(EmmaConfig, slow_image_processor_class=EmmaImageProcessor, exist_ok=True)

__all__ = ["EmmaImageProcessor", "EmmaProcessor"]
