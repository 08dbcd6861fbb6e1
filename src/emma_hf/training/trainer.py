"""
`EmmaTrainer` (a `transformers.Trainer` that logs cross-entropy and flow-matching MSE apart) and the recipe that
`emma-hf train CONFIG.yaml` runs: load a checkpoint, apply a stage (and LoRA), mix the tasks' data, train, save.

The config (YAML):

    model: path/or/hub-id            # an exported EMMA checkpoint
    stage: sft                       # align, pretrain, sft, quality, moe-expert, moe-router (or 0-4)
    output_dir: runs/sft
    data:                            # JSONL files, formats in emma_hf.training.data
      understanding: data/understanding.jsonl
      text_to_image: data/text_to_image.jsonl
      edit: data/edit.jsonl
    task_ratios: {understanding: 1, text_to_image: 1, edit: 1}   # default: the stage's
    num_samples: null                # samples per epoch (default: every file seen once)
    on_data_error: raise             # or skip (logged)
    noise_seed: null                 # fixed flow-matching noise per sample (reproducible across process counts)
    lora: {preset: generation, r: 16, lora_alpha: 32, lora_dropout: 0.0}   # optional
    resume: false                    # true: the last checkpoint in output_dir; or a checkpoint path
    training: {max_steps: 1000, per_device_train_batch_size: 4, bf16: true, activation_checkpointing: true}
                                     # any transformers.TrainingArguments field; learning_rate defaults to the stage's
"""

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from .data import TASKS, EmmaCollator, JsonlDataset, TaskMixture
from .lora import emma_lora_config
from .stages import apply_stage, get_stage


class EmmaTrainer(Trainer):
    """A Trainer whose logs carry `ce_loss` and `fm_loss` (means since the last log, over all processes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_terms = {"ce_loss": [], "fm_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for name in self.loss_terms:
                value = getattr(outputs, name, None)
                if value is not None:
                    self.loss_terms[name].append(value.detach().float())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, values in self.loss_terms.items():
                mean = torch.stack(values).mean() if values else torch.tensor(float("nan"))
                mean = self.accelerator.reduce(mean.to(self.args.device), reduction="mean")
                if values:
                    logs[name] = round(mean.item(), 6)
                values.clear()
        super().log(logs, start_time)


@dataclass
class TrainConfig:
    model: str
    stage: str
    output_dir: str
    data: dict[str, str]
    task_ratios: dict[str, float] | None = None
    num_samples: int | None = None
    on_data_error: str = "raise"
    noise_seed: int | None = None
    lora: dict | None = None
    resume: bool | str = False
    training: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Read and check a config file; paths in it are relative to the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {str(path)!r}")
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        missing = sorted(name for name in ("model", "stage", "output_dir", "data") if name not in raw)
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        base = path.parent
        raw["data"] = {task: str(base / file) for task, file in (raw["data"] or {}).items()}
        raw["output_dir"] = str(base / raw["output_dir"])
        if (base / raw["model"]).exists():
            raw["model"] = str(base / raw["model"])
        config = cls(**raw)
        config.check()
        return config

    def check(self) -> None:
        get_stage(self.stage)
        unknown = sorted(set(self.data) - set(TASKS))
        if unknown or not self.data:
            raise ValueError(f"data must map tasks {TASKS} to JSONL files; got {sorted(self.data)}")
        if self.on_data_error not in ("raise", "skip"):
            raise ValueError(f"on_data_error must be 'raise' or 'skip', got {self.on_data_error!r}")
        if self.lora is not None and "preset" not in self.lora:
            raise ValueError("lora needs a preset: understanding, generation or all")


def build_trainer(config: TrainConfig) -> EmmaTrainer:
    """Everything `emma-hf train` sets up before `trainer.train()`."""
    stage = get_stage(config.stage)
    model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(config.model)
    apply_stage(model, stage.name)
    if config.lora is not None:
        from peft import get_peft_model

        lora = dict(config.lora)
        model = get_peft_model(model, emma_lora_config(model, lora.pop("preset"), **lora))
    datasets = {task: JsonlDataset(path, task, config.on_data_error) for task, path in config.data.items()}
    ratios = config.task_ratios or {task: r for task, r in stage.task_ratios.items() if task in datasets}
    dataset = TaskMixture(datasets, ratios, config.num_samples)
    arguments = {
        "learning_rate": stage.learning_rate,
        "logging_steps": 10,
        "save_strategy": "steps",
        "report_to": "none",
        **config.training,
        "output_dir": config.output_dir,
        "remove_unused_columns": False,
    }
    checkpointing = arguments.get("activation_checkpointing") or arguments.get("gradient_checkpointing")
    if checkpointing and config.lora is not None:
        model.enable_input_require_grads()
    return EmmaTrainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=EmmaCollator(processor, model.config, config.noise_seed),
        processing_class=processor,
    )


def run_training(config: TrainConfig) -> EmmaTrainer:
    """Train, then save: the adapter (LoRA) or an exported checkpoint, under `output_dir/final`."""
    trainer = build_trainer(config)
    resume = config.resume
    if resume is True and not list(Path(config.output_dir).glob("checkpoint-*")):
        resume = False
    trainer.train(resume_from_checkpoint=resume or None)
    final = Path(config.output_dir) / "final"
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if config.lora is not None:
            model.save_pretrained(final)
        else:
            from ..convert import export_checkpoint

            export_checkpoint(model, trainer.processing_class, final)
    return trainer
