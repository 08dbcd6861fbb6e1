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
    text_dropout: null               # condition dropout for classifier-free guidance (default: the stage's)
    image_dropout: null
    max_context_pixels: null         # pixels of a context image (default: the stage's; stages 0-1: 512*512)
    reinitialize_stem_expert: true   # moe-expert: start the STEM expert from the tuned versatile one
    lora: {preset: generation, r: 16, lora_alpha: 32, lora_dropout: 0.0}   # optional
    resume: false                    # true: the last checkpoint in output_dir; or a checkpoint path
    training: {max_steps: 1000, per_device_train_batch_size: 4, bf16: true, activation_checkpointing: true}
                                     # any transformers.TrainingArguments field; learning_rate defaults to the stage's
"""

import contextlib
import errno
import os
import shutil
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from peft import LoraConfig
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..processing_emma import EmmaProcessor, words_of
from .data import TASKS, EmmaCollator, JsonlDataset, TaskMixture, is_probability
from .lora import LORA_PRESETS, emma_lora_config
from .stages import apply_stage, get_stage


# Checkpoints are written under this folder of output_dir, then renamed into place.
STAGING_FOLDER = ".checkpoint-staging"
# Held in output_dir by the process training into it.
LOCK_NAME = ".emma-train.lock"
# A checkpoint write that fails with less free space than this is reported as a full disk.
LOW_DISK_BYTES = 64 * 2**20


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class EmmaTrainer(Trainer):
    """
    A Trainer whose logs carry `ce_loss` and `fm_loss` (means since the last log, over all processes) and whose
    checkpoints appear atomically: each is written in a staging folder and renamed to `checkpoint-N` when complete,
    so a process killed mid-save leaves the previous checkpoint as the last one `resume_from_checkpoint` finds.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_terms = {"ce_loss": [], "fm_loss": []}
        self.saving_checkpoint = False

    def _remove_unused_columns(self, dataset, description: str | None = None):
        """Samples keep every field: [`EmmaCollator`] reads `task`, `prompt`, images... that `forward` does not take."""
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        return data_collator

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_FOLDER) if self.saving_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING_FOLDER, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self.saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as error:
            # torch.save reports a full disk as "unexpected pos ..." or a failed write: say what happened.
            free = shutil.disk_usage(run_dir).free
            if getattr(error, "errno", None) == errno.ENOSPC or free < LOW_DISK_BYTES:
                raise OSError(
                    errno.ENOSPC,
                    f"the disk of {run_dir!r} is full ({free / 2**20:.0f} MiB free) while writing {name}: free space "
                    f"and run again with resume: true (the previous checkpoint is whole); the write failed with: {error}",
                ) from error
            raise
        finally:
            self.saving_checkpoint = False
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        replaced = staged + ".replaced"
        if os.path.exists(final):
            os.rename(final, replaced)
        os.rename(staged, final)
        shutil.rmtree(replaced, ignore_errors=True)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

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
    text_dropout: float | None = None
    image_dropout: float | None = None
    max_context_pixels: int | None = None
    reinitialize_stem_expert: bool = True
    lora: dict | None = None
    resume: bool | str = False
    training: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Read and check a config file; paths in it are relative to the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {str(path)!r}")
        try:
            loader = UniqueKeyLoader(path.read_text())
            try:
                raw = loader.get_single_data()
            finally:
                loader.dispose()
        except yaml.YAMLError as error:
            # safe_load builds plain values only: a python/object tag is refused here, never run.
            raise ValueError(f"{path}: not a plain YAML mapping of settings ({error})") from error
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        missing = sorted(name for name in ("model", "stage", "output_dir", "data") if name not in raw)
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        config = cls(**raw)
        try:
            config.check()
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path}: {error}") from error
        base = path.parent
        config.data = {task: os.path.normpath(base / file) for task, file in config.data.items()}
        for task, file in config.data.items():
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{path}: {task} data file not found: {file!r} (data paths are relative to the config file)"
                )
        config.output_dir = os.path.normpath(base / config.output_dir)
        model = base / Path(config.model).expanduser()
        if model.exists():
            config.model = os.path.normpath(model)
        elif config.model.startswith((".", "/", "~")) or config.model.count("/") != 1:
            raise FileNotFoundError(
                f"{path}: model folder not found: {str(model.resolve())!r} (`model: {config.model}` is relative to the config "
                "file); point it at an exported EMMA folder or a Hub id"
            )
        return config

    def check(self) -> None:
        """Every setting, checked before the model loads."""
        get_stage(self.stage)
        for name in ("model", "output_dir"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.data, dict) or not all(isinstance(file, str) for file in self.data.values()):
            raise TypeError(f"data must map tasks {TASKS} to JSONL file paths, got {self.data!r}")
        unknown = sorted(set(self.data) - set(TASKS))
        if unknown or not self.data:
            raise ValueError(f"data must map tasks {TASKS} to JSONL files; got {sorted(self.data)}")
        if self.task_ratios is not None and not (
            isinstance(self.task_ratios, dict)
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in self.task_ratios.values())
        ):
            raise TypeError(f"task_ratios must map task names to numbers, got {self.task_ratios!r}")
        if self.task_ratios is not None:
            unknown = sorted(set(self.task_ratios) - set(self.data))
            left_out = sorted(set(self.data) - set(self.task_ratios))
            if unknown or left_out:
                raise ValueError(
                    f"task_ratios must give a ratio to each task of `data` ({sorted(self.data)}) and no other; "
                    + (f"{unknown} have no data" if unknown else f"{left_out} would be left out silently")
                    + " (a ratio of 0 leaves a task out on purpose)"
                )
        if self.max_context_pixels is not None and (
            not isinstance(self.max_context_pixels, int)
            or isinstance(self.max_context_pixels, bool)
            or self.max_context_pixels < 1
        ):
            raise TypeError(f"max_context_pixels must be a positive integer or null, got {self.max_context_pixels!r}")
        for name in ("num_samples", "noise_seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise TypeError(f"{name} must be a non-negative integer or null, got {value!r}")
        for name in ("text_dropout", "image_dropout"):
            value = getattr(self, name)
            if value is not None and not is_probability(value):
                raise ValueError(f"{name} must be a probability in [0, 1] or null, got {value!r}")
        if self.on_data_error not in ("raise", "skip"):
            raise ValueError(f"on_data_error must be 'raise' or 'skip', got {self.on_data_error!r}")
        if self.lora is not None and (not isinstance(self.lora, dict) or self.lora.get("preset") not in LORA_PRESETS):
            raise ValueError(f"lora needs a preset, one of {sorted(LORA_PRESETS)}; got {self.lora!r}")
        if not isinstance(self.reinitialize_stem_expert, bool):
            raise TypeError(f"reinitialize_stem_expert must be true or false, got {self.reinitialize_stem_expert!r}")
        if not isinstance(self.resume, (bool, str)):
            raise TypeError(f"resume must be true, false or a checkpoint path, got {self.resume!r}")
        if not isinstance(self.training, dict):
            raise TypeError(f"training must map TrainingArguments fields to values, got {self.training!r}")
        if "output_dir" in self.training:
            raise ValueError(
                "training.output_dir would be ignored: the run writes to the top-level output_dir; set it there only"
            )
        known = {f.name for f in fields(TrainingArguments)}
        unknown = sorted(set(self.training) - known)
        if unknown:
            raise ValueError(
                f"training has keys that are not transformers.TrainingArguments fields: {unknown} "
                "(see the TrainingArguments documentation for the allowed names)"
            )
        check_training_arguments(self.training)
        if self.lora is not None:
            allowed = {f.name for f in fields(LoraConfig)} - {"target_modules", "task_type"}
            unknown = sorted(set(self.lora) - allowed - {"preset"})
            if unknown:
                raise ValueError(f"lora has keys that are not peft.LoraConfig fields: {unknown}")


# TrainingArguments fields that count things, which must be at least 1.
POSITIVE_TRAINING_COUNTS = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps")


def check_training_arguments(training: dict) -> None:
    """
    The values of `training` have the plain types (bool, int, float, str) that `TrainingArguments` declares for them,
    and counts are at least 1: checked before the model loads.
    """
    hints = typing.get_type_hints(TrainingArguments)
    for name, value in training.items():
        declared = hints.get(name)
        union = typing.get_origin(declared) in (typing.Union, types.UnionType)
        kinds = [kind for kind in (typing.get_args(declared) if union else (declared,)) if kind is not type(None)]
        if value is None or not kinds or not all(kind in (bool, int, float, str) for kind in kinds):
            continue
        if not has_kind(value, kinds):
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) else ""
            raise TypeError(f"training.{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}{hint}")
    for name in POSITIVE_TRAINING_COUNTS:
        if name in training and has_kind(training[name], [int]) and training[name] < 1:
            raise ValueError(f"training.{name} must be at least 1, got {training[name]}")


def has_kind(value, kinds: list[type]) -> bool:
    """`value` is one of `kinds`, an int counting as a float and a bool as neither."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return isinstance(value, tuple(kinds))


def build_trainer(config: TrainConfig) -> EmmaTrainer:
    """Everything `emma-hf train` sets up before `trainer.train()`."""
    stage = get_stage(config.stage)
    seed = config.training.get("seed", TrainingArguments.seed)
    # The Trainer seeds only once it is built; LoRA matrices and stage changes made before it are seeded here.
    set_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(config.model)
    apply_stage(model, stage.name, config.reinitialize_stem_expert)
    if config.lora is not None:
        from peft import get_peft_model

        lora = dict(config.lora)
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias: noise the user did not cause.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(model, emma_lora_config(model, lora.pop("preset"), **lora))
    datasets = {task: JsonlDataset(path, task, config.on_data_error) for task, path in config.data.items()}
    ratios = config.task_ratios or {task: r for task, r in stage.task_ratios.items() if task in datasets}
    dataset = TaskMixture(datasets, ratios, config.num_samples)
    arguments = {
        "learning_rate": stage.learning_rate,
        "logging_steps": 10,
        "save_strategy": "steps",
        "report_to": "none",
        # Pinned memory only helps copies to an accelerator; on a CPU-only machine torch warns about it.
        "dataloader_pin_memory": torch.accelerator.is_available(),
        **config.training,
        "output_dir": config.output_dir,
    }
    checkpointing = arguments.get("activation_checkpointing") or arguments.get("gradient_checkpointing")
    if checkpointing and config.lora is not None:
        model.enable_input_require_grads()
    return EmmaTrainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=EmmaCollator(
            processor,
            model.config,
            config.noise_seed,
            text_dropout=stage.text_dropout if config.text_dropout is None else config.text_dropout,
            image_dropout=stage.image_dropout if config.image_dropout is None else config.image_dropout,
            dropout_seed=seed,
            max_context_pixels=(
                stage.max_context_pixels if config.max_context_pixels is None else config.max_context_pixels
            ),
        ),
        processing_class=processor,
    )


def run_training(config: TrainConfig) -> EmmaTrainer:
    """
    Train, then save: the adapter (LoRA) or an exported checkpoint, under `output_dir/final`. A lock file keeps a
    second run from writing into the same `output_dir` meanwhile.
    """
    with output_dir_lock(config.output_dir):
        return train_and_save(config)


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """
    `output_dir/.emma-train.lock` holding this process's id while it trains (the main process of a distributed run
    takes it). A lock whose process has ended is stale and taken over; a live one is an error naming its process.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    lock = Path(output_dir) / LOCK_NAME
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text().strip()
            if holder.isdigit() and process_is_running(int(holder)):
                raise RuntimeError(
                    f"{output_dir!r} is being written by another training run (process {holder}); wait for it to "
                    f"finish or choose another output_dir (a stale lock is {str(lock)!r})"
                ) from None
            lock.unlink(missing_ok=True)
    else:
        raise RuntimeError(f"could not take the training lock {str(lock)!r}; remove it if no run is using the folder")
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def train_and_save(config: TrainConfig) -> EmmaTrainer:
    trainer = build_trainer(config)
    checkpoint = config.resume
    if checkpoint is True:
        checkpoint = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
    if checkpoint and reached_max_steps(checkpoint, trainer.args):
        # The Trainer would run one more step from a checkpoint at max_steps; a finished run is only exported.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    else:
        trainer.train(resume_from_checkpoint=checkpoint or None)
    final = Path(config.output_dir) / "final"
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if config.lora is not None:
            model.save_pretrained(final)
        else:
            from ..hub import export_checkpoint

            add_learnt_words(trainer.processing_class, trainer.train_dataset.datasets.values())
            export_checkpoint(model, trainer.processing_class, final, training=training_summary(config, trainer))
    return trainer


def reached_max_steps(checkpoint: str, arguments: TrainingArguments) -> bool:
    state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    return state.global_step >= (arguments.max_steps if arguments.max_steps > 0 else state.max_steps)


def add_learnt_words(processor: EmmaProcessor, datasets) -> None:
    """Grow a closed-vocabulary processor's `known_words` by the words of the training data: the model learnt them."""
    if processor.known_words is not None:
        learnt = {word for dataset in datasets for text in dataset.texts() for word in words_of(text)}
        processor.known_words = sorted(set(processor.known_words) | learnt)


def training_summary(config: TrainConfig, trainer: EmmaTrainer) -> str:
    """How `emma-hf train` made a checkpoint, for its model card."""
    collator = trainer.data_collator
    data = ", ".join(f"{task} ({len(dataset)} samples)" for task, dataset in trainer.train_dataset.datasets.items())
    return (
        f"`emma-hf train`, stage `{get_stage(config.stage).name}`, {trainer.state.global_step} steps of "
        f"{trainer.args.per_device_train_batch_size} samples per device from {config.model}, on {data}; condition "
        f"dropout: text {collator.text_dropout}, source image {collator.image_dropout}"
        + (
            f"; context images of at most {collator.max_context_pixels} pixels."
            if collator.max_context_pixels
            else "."
        )
    )
