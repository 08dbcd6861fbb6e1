"""
PEFT LoRA presets for EMMA, as lists of full module names (PEFT matches a list by exact name or name ending):

- `understanding`: the decoder's `und` attention and MLP projections and `und_adapter`. In shallow layers these are
  shared with the `gen` stream (all but `shallow_decoupled_modules`), so generation moves a little too.
- `generation`: the decoder's `gen` copies, `gen_adapter`, the timestep embedding and `velocity_head`. Text and
  context-image tokens never pass through them, so chat is untouched: tune editing without changing answers.
- `all`: both.
"""

from peft import LoraConfig
from torch import nn


LORA_PRESETS = ("understanding", "generation", "all")
GENERATION_PREFIXES = ("model.gen_adapter.", "model.time_embed.", "velocity_head.")


def is_understanding_module(name: str) -> bool:
    in_decoder = ".language_model.layers." in name and ".gen." not in name
    return (in_decoder and (".self_attn." in name or ".mlp." in name)) or "und_adapter." in name


def is_generation_module(name: str) -> bool:
    stripped = name.split("base_model.model.")[-1]
    return (".language_model.layers." in name and ".gen." in name) or stripped.startswith(GENERATION_PREFIXES)


def lora_target_modules(model: nn.Module, preset: str) -> list[str]:
    """Full names of the linear layers a LoRA preset adapts."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {preset!r}; use one of {LORA_PRESETS}")
    wanted = {
        "understanding": is_understanding_module,
        "generation": is_generation_module,
        "all": lambda name: is_understanding_module(name) or is_generation_module(name),
    }[preset]
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and wanted(name)]
    if not names:
        raise ValueError(f"LoRA preset {preset!r} found no linear layers: is this an EMMA model?")
    return names


def emma_lora_config(
    model: nn.Module, preset: str, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kwargs
) -> LoraConfig:
    """A `LoraConfig` (task `CAUSAL_LM`) targeting a preset's modules; `kwargs` go to `LoraConfig`."""
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(model, preset),
        task_type="CAUSAL_LM",
        **kwargs,
    )
