"""Training EMMA: data formats and collator, the paper's stage presets, LoRA presets and the Trainer recipe."""

from .data import DataError, EmmaCollator, EmmaSample, JsonlDataset, TaskMixture
from .lora import LORA_PRESETS, emma_lora_config, lora_target_modules
from .stages import STAGES, StagePreset, apply_stage, get_stage
from .trainer import EmmaTrainer, TrainConfig, build_trainer, run_training


__all__ = [
    "LORA_PRESETS",
    "STAGES",
    "DataError",
    "EmmaCollator",
    "EmmaSample",
    "EmmaTrainer",
    "JsonlDataset",
    "StagePreset",
    "TaskMixture",
    "TrainConfig",
    "apply_stage",
    "build_trainer",
    "emma_lora_config",
    "get_stage",
    "lora_target_modules",
    "run_training",
]
