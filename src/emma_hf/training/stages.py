"""
The paper's training stages as presets: which parameters train, the vision router mode while training, the task mix
and a default learning rate. The DC-AE is frozen in every stage.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..modeling_emma import EmmaModel


def is_und_adapter(name: str) -> bool:
    return name.startswith("model.und_adapter.")


def is_stem_expert(name: str) -> bool:
    return ".mlp.experts." in name and ".mlp.experts.0." not in name


def is_router(name: str) -> bool:
    return name.startswith("model.vision_tower.router.")


def is_not_vae(name: str) -> bool:
    return not name.startswith("model.vae.")


@dataclass(frozen=True)
class StagePreset:
    """
    trains: which parameter names train (all others are frozen).
    router_mode: the vision router mode while training (never saved): stages 0-3 run the original SigLIP2 MLP
        (`versatile`), the expert-tuning stage forces `stem`, the router-tuning stage routes top-1 as inference will,
        the router learning through a straight-through estimator.
    inference_router_mode: what the checkpoint routes with once the stage has trained (`config.vision_router_mode`):
        `top1` after router tuning; None leaves the checkpoint's mode.
    task_ratios: default mix of understanding / text-to-image / edit samples.
    learning_rate: default peak learning rate.
    text_dropout, image_dropout: default condition dropout ([`EmmaCollator`]) in the stages that train drawing: the
        prompt blanked for 1 image sample in 10 (as BAGEL and most diffusion models train text guidance), an edit's
        source image dropped for 1 in 5 (the middle of the 0.1-0.4 range unified editors use for image guidance).
    max_context_pixels: default budget of a context image in pixels ([`EmmaCollator`]): SigLIP2 and the DC-AE read
        one image on one token grid, so this is SigLIP2's budget too. Stages 0-1 read at most 512x512 (1024 SigLIP2
        patches), as VLMs pretrain at low resolution; later stages read what the processor's `size` allows.
    """

    name: str
    description: str
    trains: Callable[[str], bool]
    router_mode: str
    task_ratios: dict[str, float] = field(default_factory=dict)
    learning_rate: float = 1e-4
    text_dropout: float = 0.0
    image_dropout: float = 0.0
    max_context_pixels: int | None = None
    inference_router_mode: str | None = None


# Context images of the alignment and pretraining stages.
LOW_RESOLUTION_PIXELS = 512 * 512

STAGES = {
    preset.name: preset
    for preset in (
        StagePreset(
            "align",
            "stage 0: the understanding adapter only",
            is_und_adapter,
            "versatile",
            {"understanding": 1.0},
            1e-3,
            max_context_pixels=LOW_RESOLUTION_PIXELS,
        ),
        StagePreset(
            "pretrain",
            "stage 1: everything but the DC-AE, understanding and generation 1:1",
            is_not_vae,
            "versatile",
            {"understanding": 1.0, "text_to_image": 1.0},
            1e-4,
            text_dropout=0.1,
            max_context_pixels=LOW_RESOLUTION_PIXELS,
        ),
        StagePreset(
            "sft",
            "stage 2: everything but the DC-AE, understanding, generation and editing 1:1:1",
            is_not_vae,
            "versatile",
            {"understanding": 1.0, "text_to_image": 1.0, "edit": 1.0},
            5e-5,
            text_dropout=0.1,
            image_dropout=0.2,
        ),
        StagePreset(
            "quality",
            "stage 3: everything but the DC-AE on high-quality data, lr 1e-5",
            is_not_vae,
            "versatile",
            {"understanding": 1.0, "text_to_image": 1.0, "edit": 1.0},
            1e-5,
            text_dropout=0.1,
            image_dropout=0.2,
        ),
        StagePreset(
            "moe-expert",
            "stage 4 (ET): the STEM expert only",
            is_stem_expert,
            "stem",
            {"understanding": 1.0},
            1e-4,
        ),
        StagePreset(
            "moe-router",
            "stage 4 (RT): the vision router only",
            is_router,
            "top1",
            {"understanding": 1.0},
            1e-4,
            inference_router_mode="top1",
        ),
    )
}
STAGE_ALIASES = {"0": "align", "1": "pretrain", "2": "sft", "3": "quality", "4": "moe-expert"}


def get_stage(stage: str | int) -> StagePreset:
    """A stage by name (`align`, `pretrain`, `sft`, `quality`, `moe-expert`, `moe-router`) or number 0-4."""
    name = STAGE_ALIASES.get(str(stage), str(stage))
    if name not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {sorted(STAGES)} or 0-4")
    return STAGES[name]


def apply_stage(model: nn.Module, stage: str | int, reinitialize_stem_expert: bool = True) -> list[str]:
    """
    Set `requires_grad`, the training router mode and the checkpoint's inference router mode for `stage`; return
    the names of the trainable parameters. The expert-tuning stage first copies the versatile expert, as tuned by
    the stages before it, into the STEM expert (`reinitialize_stem_expert=False` keeps the STEM expert as it is).
    """
    preset = get_stage(stage)
    emma = next((module for module in model.modules() if isinstance(module, EmmaModel)), None)
    if emma is None:
        raise TypeError(f"apply_stage needs an EMMA model, got {type(model).__name__}")
    emma.training_router_mode = preset.router_mode
    if preset.inference_router_mode is not None:
        emma.config.vision_router_mode = preset.inference_router_mode
    if preset.name == "moe-expert" and reinitialize_stem_expert:
        emma.initialize_experts_from_versatile()
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(preset.trains(name))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable
