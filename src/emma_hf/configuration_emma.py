# Copyright 2026 The emma_hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of EMMA (arXiv 2512.04810): a Qwen3 decoder, a SigLIP2 encoder with MoE MLPs and a DC-AE."""

import copy
import json
import math
import os
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

# The literal reading of the paper's shared-and-decoupled decoder (see `EmmaConfig.deep_decoupled_modules`).
PRESETS["emma-4b-literal"] = {
    **PRESETS["emma-4b"],
    "shallow_decoupled_modules": [],
    "deep_decoupled_modules": ["v_proj", "o_proj", "post_attention_layernorm", "mlp"],
}


def vae_spatial_compression(vae_config: dict) -> int:
    """Downsampling factor of an `AutoencoderDC`, as diffusers computes it."""
    return 2 ** (len(vae_config["encoder_block_out_channels"]) - 1)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_non_negative_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


# Sampler settings a checkpoint may fix for `EmmaPipeline` (`EmmaConfig.image_sampler_defaults`), with their checks.
SAMPLER_SETTINGS = {
    "num_inference_steps": ("an integer >= 1", is_positive_int),
    "guidance_scale": ("a number >= 0", is_non_negative_number),
    "image_guidance_scale": ("a number >= 0", is_non_negative_number),
}


def clearer_load_error(source: str, subfolder: str | None, error: Exception) -> Exception | None:
    """
    For an EMMA model or processor that failed to load: an error naming the damaged JSON files of a local folder, or
    saying that a name that is no local folder was looked up on the Hub (a mistyped relative path); else None.
    """
    folder = os.path.join(source, subfolder or "")
    if isinstance(error, json.JSONDecodeError) and os.path.isdir(folder):
        damaged = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as file:
                        json.load(file)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    damaged.append(name)
        return OSError(
            f"{source!r}: {damaged or 'a file'} is not valid JSON (damaged or truncated: {error}); save or download "
            "the checkpoint again"
        )
    if isinstance(error, OSError) and not os.path.isdir(source):
        return OSError(
            f"{source!r} is not a folder here (working folder {os.getcwd()!r}), so it was looked up as a Hub model id "
            f"and that failed: {error}"
        )
    return None


def check_not_an_export(save_directory: str, what: str) -> None:
    """
    Saving one part into an exported folder would leave that part's copy for diffusers (`model/`, `processor/`)
    stale, so a pipeline would load the old one: an export is replaced whole, by exporting again.
    """
    if os.path.isfile(os.path.join(save_directory, "model_index.json")):
        raise ValueError(
            f"{save_directory!r} is an exported EMMA checkpoint (it has model_index.json): saving {what} alone would "
            "leave the copy in its subfolder, which diffusers loads, stale. Export again instead, with "
            "emma_hf.hub.export_checkpoint(model, processor, folder) or pipe.save_pretrained(folder)"
        )


def check_sampler_defaults(defaults: dict) -> None:
    if not isinstance(defaults, dict):
        raise ValueError(f"image_sampler_defaults must be a dict or None, got {defaults!r}")
    unknown = sorted(set(defaults) - set(SAMPLER_SETTINGS))
    if unknown:
        raise ValueError(f"image_sampler_defaults has unknown settings {unknown}; allowed: {list(SAMPLER_SETTINGS)}")
    for name, value in defaults.items():
        allowed, is_valid = SAMPLER_SETTINGS[name]
        if not is_valid(value):
            raise ValueError(f"image_sampler_defaults[{name!r}] must be {allowed}, got {value!r}")


@strict
class EmmaConfig(PreTrainedConfig):
    r"""
    Configuration of [`EmmaModel`] and [`EmmaForConditionalGeneration`].

    Args:
        text_config (`dict` or `Qwen3Config`): the decoder; every layer gets a second (`gen`) copy of its decoupled parts.
        vision_config (`dict` or `Siglip2VisionConfig`): the understanding encoder (SigLIP2, NaFlex patches).
        vae_config (`dict`): keyword arguments of diffusers' `AutoencoderDC`, the frozen generation encoder/decoder.
        num_shallow_layers (`int`, *optional*): layers `[0, num_shallow_layers)` share all weights except
            `shallow_decoupled_modules`; deeper layers share all but `deep_decoupled_modules`. Defaults to half the
            layers.
        shallow_decoupled_modules (`list[str]`): parts with one copy per stream in shallow layers (default `v_proj`).
        deep_decoupled_modules (`list[str]`, *optional*): parts with one copy per stream in deep layers; defaults
            to every part (a full copy per stream). The paper's text admits two readings of "shared-and-decoupled":
            this default one, and the literal one of the `emma-4b-literal` preset (Q/K shared in every layer,
            shallow layers sharing everything, deep layers decoupling V, O and the FFN after them).
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
        image_sampler_defaults (`dict`, *optional*): the sampler settings `EmmaPipeline` and `emma-hf` use when a
            call gives none, as tuned for this checkpoint: any of `num_inference_steps`, `guidance_scale`,
            `image_guidance_scale` (the pipeline's own defaults fill the rest).
        flow_*: flow-matching defaults; t ~ logit-normal(`flow_logit_mean`, `flow_logit_std`), then shifted by
            `exp(mu)` where `mu` grows linearly with the image's token count from `flow_base_shift` at
            `flow_base_image_seq_len` to `flow_max_shift` at `flow_max_image_seq_len` (the schedule of diffusers'
            `FlowMatchEulerDiscreteScheduler` with dynamic shifting); `flow_shift` replaces it when
            `flow_use_dynamic_shifting` is False. FLUX's constants (0.5 at 256 tokens, 1.15 at 4096) count 16-px
            tokens; EMMA's tokens cover 32x32 pixels, so the same image sizes are 64 and 1024 tokens here: a 256²
            image gets shift 1.65, 512² 1.88 and 1024² 3.16, the shifts FLUX gives those sizes (SANA, also 32-px,
            uses a fixed 3.0 at 1024²).
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
    deep_decoupled_modules: list[str] | tuple[str, ...] | None = None
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
    flow_base_image_seq_len: int = 64
    flow_max_image_seq_len: int = 1024
    flow_weighting_scheme: str = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    ce_weight: float = 1.0
    fm_weight: float = 1.0
    image_sampler_defaults: dict | None = None

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
        if self.deep_decoupled_modules is None:
            self.deep_decoupled_modules = list(DECOUPLABLE_MODULES)
        self.deep_decoupled_modules = list(self.deep_decoupled_modules)
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
        for field in ("shallow_decoupled_modules", "deep_decoupled_modules"):
            unknown = sorted(set(getattr(self, field)) - set(DECOUPLABLE_MODULES))
            if unknown:
                raise ValueError(f"{field} has unknown names {unknown}; allowed: {list(DECOUPLABLE_MODULES)}")
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
        if self.image_sampler_defaults is not None:
            check_sampler_defaults(self.image_sampler_defaults)
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

    def flow_scheduler_config(self) -> dict:
        """Settings of diffusers' `FlowMatchEulerDiscreteScheduler` that draw with the shift the model trained with."""
        return {
            "num_train_timesteps": 1000,
            "shift": self.flow_shift,
            "use_dynamic_shifting": self.flow_use_dynamic_shifting,
            "base_shift": self.flow_base_shift,
            "max_shift": self.flow_max_shift,
            "base_image_seq_len": self.flow_base_image_seq_len,
            "max_image_seq_len": self.flow_max_image_seq_len,
        }

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
        chosen = self.shallow_decoupled_modules if layer_idx < self.num_shallow_layers else self.deep_decoupled_modules
        return tuple(name for name in DECOUPLABLE_MODULES if name in chosen)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EmmaConfig":
        """Build a named configuration (`emma-4b`, `emma-4b-literal`, `tiny`); keyword arguments override its fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


__all__ = ["EmmaConfig"]
