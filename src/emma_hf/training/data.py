"""
Training data: one JSONL format per task, datasets that read lines lazily, a deterministic task mixture, and the
collator that turns mixed samples into one padded EMMA batch.

Formats (one JSON object per line; image paths relative to the JSONL file):

    understanding   {"images": ["cat.png"], "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                        {"role": "assistant", "content": "A cat."}]}
                    `content` is a string or a list of text/image items; image items take `images` in order.
    text_to_image   {"prompt": "a red circle", "image": "circle.png"}
    edit            {"image": "before.png", "instruction": "make it blue", "target": "after.png"}
"""

import json
import logging
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import PIL.Image
import torch
from torch.utils.data import Dataset

from ..configuration_emma import EmmaConfig
from ..modeling_emma import sample_flow_timesteps, unpack_images
from ..processing_emma import (
    CHAT_TOKENS,
    EMMA_SPECIAL_TOKENS,
    GEN_START_TOKEN,
    GEN_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
    EmmaProcessor,
    UnknownWordsWarning,
    check_unicode,
    fit_to_token_grid,
    message_texts,
    open_image,
)


logger = logging.getLogger(__name__)

TASKS = ("understanding", "text_to_image", "edit")
REQUIRED_FIELDS = {
    "understanding": {"images": list, "messages": list},
    "text_to_image": {"prompt": str, "image": str},
    "edit": {"image": str, "instruction": str, "target": str},
}
IGNORE_INDEX = -100
# Task ratios are mixed as fractions with denominators up to this.
RATIO_RESOLUTION = 1000
CHAT_ROLES = ("system", "user", "assistant")
# The field that holds an image sample's text (understanding samples hold theirs in `messages`).
TEXT_FIELDS = {"text_to_image": "prompt", "edit": "instruction"}
# Token strings that the collator writes itself: typed in training text they would be read as structure.
RESERVED_TEXT = (*EMMA_SPECIAL_TOKENS.values(), *CHAT_TOKENS)


class DataError(ValueError):
    """A training sample that cannot be used, located by file and line."""


class EmmaSample(Mapping):
    """
    One training sample, read-only. It is a `Mapping` but not a `dict` so that the `Trainer`'s default
    `remove_unused_columns=True`, which strips the keys of dict samples that `forward` does not name, hands it to
    [`EmmaCollator`] whole.
    """

    def __init__(self, fields: Mapping):
        self.fields = dict(fields)

    def __getitem__(self, name: str):
        return self.fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"EmmaSample({self.fields!r})"


class JsonlDataset(Dataset):
    """
    The samples of one task's JSONL file. Only line offsets are read up front; each item is parsed, checked and its
    images opened when it is asked for. `on_error="skip"` logs a bad line and uses the next good one instead of
    raising.
    """

    def __init__(self, path: str | Path, task: str, on_error: str = "raise"):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path, self.task, self.on_error = Path(path), task, on_error
        if not self.path.is_file():
            raise FileNotFoundError(f"{task} data file not found: {str(self.path)!r}")
        self.offsets, self.line_numbers = [], []
        with self.path.open("rb") as file:
            offset = 0
            for number, line in enumerate(file, start=1):
                if line.strip():
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)
        if not self.offsets:
            raise DataError(f"{self.path}: no samples")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> EmmaSample:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return self.read(position)
            except DataError as error:
                if self.on_error == "raise":
                    raise
                logger.warning("skipping a bad sample: %s", error)
        raise DataError(f"{self.path}: every sample is bad")

    def texts(self) -> Iterator[str]:
        """The text of every well-formed line (prompts, instructions, messages), without opening any image."""
        with self.path.open("rb") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if self.task == "understanding" and isinstance(record.get("messages"), list):
                    yield from message_texts(record["messages"])
                text = record.get(TEXT_FIELDS.get(self.task))
                if isinstance(text, str):
                    yield text

    def read(self, position: int) -> EmmaSample:
        where = f"{self.path}:{self.line_numbers[position]}"
        with self.path.open("rb") as file:
            file.seek(self.offsets[position])
            line = file.readline()
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from error
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        for name, kind in REQUIRED_FIELDS[self.task].items():
            if name not in record:
                raise DataError(f"{where}: {self.task} samples need the field {name!r} ({kind.__name__})")
            if not isinstance(record[name], kind):
                raise DataError(
                    f"{where}: field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}"
                )
        try:
            if self.task == "understanding":
                check_messages(record["messages"], where)
                if not all(isinstance(path, str) for path in record["images"]):
                    raise ValueError(f"{where}: 'images' must list image paths (strings), got {record['images']!r}")
            check_plain_text(sample_texts(self.task, record), where)
        except ValueError as error:
            raise DataError(str(error)) from error
        sample = {"task": self.task, "where": where}
        if self.task == "understanding":
            sample["messages"] = record["messages"]
            sample["images"] = [self.open_image(path, where) for path in record["images"]]
            count = sum(
                1
                for message in record["messages"]
                if isinstance(message["content"], list)
                for item in message["content"]
                if item["type"] == "image"
            )
            if count != len(sample["images"]):
                raise DataError(
                    f"{where}: the messages hold {count} image items but 'images' lists {len(sample['images'])}"
                )
        elif self.task == "text_to_image":
            sample["prompt"], sample["target"] = record["prompt"], self.open_image(record["image"], where)
        else:
            sample["instruction"] = record["instruction"]
            sample["images"] = [self.open_image(record["image"], where)]
            sample["target"] = self.open_image(record["target"], where)
        return EmmaSample(sample)

    def open_image(self, relative_path: str, where: str) -> PIL.Image.Image:
        """The image upright as its EXIF orientation says, opened as the processor opens paths."""
        try:
            return open_image(self.path.parent / relative_path)
        except (ValueError, OSError) as error:
            raise DataError(f"{where}: {error}") from error


class TaskMixture(Dataset):
    """
    Samples of several tasks interleaved in fixed proportions (smooth weighted round-robin, so every stretch of the
    sequence has the mix), each task's dataset cycled. `num_samples` defaults to enough for every dataset to be seen
    once.
    """

    def __init__(
        self, datasets: dict[str, Dataset], ratios: dict[str, float] | None = None, num_samples: int | None = None
    ):
        ratios = {task: 1.0 for task in datasets} if ratios is None else {t: float(r) for t, r in ratios.items() if r}
        unknown = sorted(set(ratios) - set(datasets))
        if unknown or not ratios or not all(0 < r < math.inf for r in ratios.values()):
            raise ValueError(
                f"task ratios must be positive finite numbers and name tasks with data ({sorted(datasets)}); got "
                f"{ratios}" + (f", no data for {unknown}" if unknown else "")
            )
        smallest = min(ratios.values()) / max(ratios.values())
        if smallest < 1 / RATIO_RESOLUTION:
            raise ValueError(
                f"task ratios are mixed to 1/{RATIO_RESOLUTION}; got {ratios}, where the smallest is {smallest:.2g} "
                "of the largest: raise it or leave that task out"
            )
        self.datasets = {task: datasets[task] for task in ratios}
        largest = max(ratios.values())
        fractions = {
            task: Fraction(ratio / largest).limit_denominator(RATIO_RESOLUTION) for task, ratio in ratios.items()
        }
        shares = {task: fraction / sum(fractions.values()) for task, fraction in fractions.items()}
        if num_samples is None:
            num_samples = max(math.ceil(len(self.datasets[task]) / share) for task, share in shares.items())
        credit = dict.fromkeys(shares, Fraction(0))
        seen = dict.fromkeys(shares, 0)
        self.schedule = []
        for _ in range(num_samples):
            for task in credit:
                credit[task] += shares[task]
            task = max(credit, key=credit.get)
            credit[task] -= 1
            self.schedule.append((task, seen[task] % len(self.datasets[task])))
            seen[task] += 1

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, index: int) -> EmmaSample:
        task, position = self.schedule[index]
        return EmmaSample({**self.datasets[task][position], "index": index})


def sample_texts(task: str, fields: Mapping) -> list[str]:
    """The texts of a sample or JSONL record of `task` (both name their fields alike)."""
    return message_texts(fields["messages"]) if task == "understanding" else [fields[TEXT_FIELDS[task]]]


def check_messages(messages: list, where: str) -> None:
    """An understanding sample's chat: turns of a known role whose content is text or a list of text/image items."""
    if not messages:
        raise ValueError(f"{where}: 'messages' is empty")
    for number, message in enumerate(messages):
        turn = f"{where}: messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise ValueError(f"{turn} must be an object with a 'role' in {list(CHAT_ROLES)}, got {message!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"{turn}: 'content' must be a string or a list of {{'type': 'text', 'text': ...}} and "
                f"{{'type': 'image'}} items, got {type(content).__name__}"
            )
        for item in content:
            is_text = isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str)
            if not is_text and not (isinstance(item, dict) and item.get("type") == "image"):
                raise ValueError(
                    f"{turn}: content items must be {{'type': 'text', 'text': <string>}} or {{'type': 'image'}}, "
                    f"got {item!r}"
                )
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: the messages hold no assistant turn, so there is no answer to learn")


def check_plain_text(texts: Iterable[str], where: str) -> None:
    """
    Training text must be valid Unicode and must not hold the tokens the collator writes: they would add
    placeholders or chat turns.
    """
    for text in texts:
        check_unicode(text, f"{where}: the text")
        reserved = [token for token in RESERVED_TEXT if token in text]
        if reserved:
            raise ValueError(
                f"{where}: the text holds {reserved}, special tokens of EMMA's chat format; training text cannot "
                "contain them (they would add image placeholders or chat turns the sample does not have)"
            )


def is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


@dataclass
class EmmaCollator:
    """
    Mixed samples -> one right-padded batch for [`EmmaForConditionalGeneration.forward`]: `input_ids`,
    `attention_mask`, `labels` (loss on assistant text only: answers, and `<|gen_start|><|vision_start|>` ...
    `<|im_end|>` around a generated image), context images (`pixel_values`, `vae_pixel_values`) and the images to
    generate (`target_pixel_values`).

    With `noise_seed`, each sample's flow-matching noise and `t` come from a generator seeded by the seed and the
    sample's `index`, so a batch's loss does not depend on how samples are spread over processes; without it the
    model draws them.

    Condition dropout trains the branches classifier-free guidance runs: with probability `text_dropout` an image
    sample's prompt or instruction becomes empty (the pipeline's "no text" branch), and with probability
    `image_dropout` an edit's source image is left out (its "no image" branch: the instruction posed as
    text-to-image). The draws are seeded by `dropout_seed` and the sample's `index`.

    `max_context_pixels` shrinks the processor's size budget for context images (SigLIP2 and the DC-AE read the
    same resized image), as early stages train at low resolution; images to generate keep the processor's size.
    """

    processor: EmmaProcessor
    config: EmmaConfig
    noise_seed: int | None = None
    text_dropout: float = 0.0
    image_dropout: float = 0.0
    dropout_seed: int = 0
    max_context_pixels: int | None = None

    def __post_init__(self):
        for name in ("text_dropout", "image_dropout"):
            if not is_probability(getattr(self, name)):
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        self.context_size = self.budgeted_size(self.max_context_pixels)

    def budgeted_size(self, max_pixels: int | None) -> dict | None:
        """The image processor's `size` within `max_pixels` (None: the processor's own)."""
        if max_pixels is None:
            return None
        image_processor = self.processor.image_processor
        patch_size = image_processor.patch_size
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < patch_size**2:
            raise ValueError(
                f"max_context_pixels must be an integer of at least patch_size**2 ({patch_size**2}) or None, "
                f"got {max_pixels!r}"
            )
        size = image_processor.size
        if size.height is None:
            return {"min_pixels": min(size.min_pixels, max_pixels), "max_pixels": min(size.max_pixels, max_pixels)}
        if size.height * size.width <= max_pixels:
            return None
        height, width = fit_to_token_grid(size.height, size.width, patch_size, patch_size**2, max_pixels)
        return {"height": height, "width": width}

    def __call__(self, samples: Sequence[Mapping]) -> dict:
        for sample in samples:
            if not isinstance(sample, Mapping) or sample.get("task") not in TASKS:
                fields = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise ValueError(
                    f"EmmaCollator takes samples with a 'task' in {list(TASKS)} (as JsonlDataset and TaskMixture "
                    f"yield), got {fields}; plain dict samples lose their fields to the Trainer's default "
                    "remove_unused_columns=True: wrap them in EmmaSample or pass remove_unused_columns=False"
                )
        rows, context_images, targets, target_indices = [], [], [], []
        with warnings.catch_warnings():
            # Training data may teach a closed-vocabulary checkpoint new words: nothing to warn about.
            warnings.simplefilter("ignore", UnknownWordsWarning)
            for sample in map(self.with_condition_dropout, samples):
                rows.append(self.sample_segments(sample))
                context_images += sample.get("images", [])
                if "target" in sample:
                    targets.append(sample["target"])
                    target_indices.append(sample.get("index", 0))

        batch = {}
        grids = []
        if context_images:
            sizing = {} if self.context_size is None else {"size": self.context_size}
            processed = self.processor.image_processor(context_images, return_tensors="pt", **sizing)
            for name in ("pixel_values", "vae_pixel_values", "image_grid_hw"):
                batch[name] = processed[name]
            grids += processed["image_grid_hw"].prod(-1).tolist()
        target_grids = []
        if targets:
            processed = self.processor.image_processor(targets, return_tensors="pt")
            target_grids = processed["image_grid_hw"].tolist()
            patch_size = self.processor.image_processor.patch_size
            images = unpack_images(processed["vae_pixel_values"], target_grids, patch_size, "targets")
            batch["target_pixel_values"] = torch.stack(images) if len({i.shape for i in images}) == 1 else images
        ids, labels = self.tokenize(rows, grids, [rows_ * cols for rows_, cols in target_grids])
        length = max(len(row) for row in ids)
        pad_id = self.processor.tokenizer.pad_token_id
        batch["input_ids"] = torch.full((len(ids), length), pad_id, dtype=torch.long)
        batch["attention_mask"] = torch.zeros(len(ids), length, dtype=torch.long)
        batch["labels"] = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, : len(row_ids)] = torch.tensor(row_ids)
            batch["attention_mask"][row, : len(row_ids)] = 1
            batch["labels"][row, : len(row_ids)] = torch.tensor(row_labels)
        if targets and self.noise_seed is not None:
            batch["noise"], batch["timesteps"] = self.seeded_noise(target_grids, target_indices)
        return batch

    def with_condition_dropout(self, sample: dict) -> dict:
        """The sample as trained: its text condition blanked and its source image dropped, each with its rate."""
        if sample["task"] == "understanding" or not (self.text_dropout or self.image_dropout):
            return sample
        draws = random.Random(self.dropout_seed * 1_000_003 + sample.get("index", 0))
        drop_text, drop_image = draws.random() < self.text_dropout, draws.random() < self.image_dropout
        text_field = TEXT_FIELDS[sample["task"]]
        sample = {**sample, text_field: "" if drop_text else sample[text_field]}
        if sample["task"] == "edit" and drop_image:
            sample = {**sample, "task": "text_to_image", "prompt": sample.pop("instruction"), "images": []}
        return sample

    def sample_segments(self, sample: dict) -> list[tuple[str, bool]]:
        # JsonlDataset checked its samples already; dict samples made in code are checked here.
        where = sample.get("where", f"sample {sample.get('index', '?')}")
        if sample["task"] == "understanding":
            check_messages(sample["messages"], where)
        check_plain_text(sample_texts(sample["task"], sample), where)
        if sample["task"] == "understanding":
            return self.conversation_segments(sample["messages"])
        return self.generation_segments(sample[TEXT_FIELDS[sample["task"]]], sample["task"] == "edit")

    def conversation_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The chat split into (text, is_label) pieces: the text of assistant turns is labelled, headers are not."""
        segments, rendered = [], ""
        for turn in range(len(messages)):
            with_turn = self.processor.apply_chat_template(messages[: turn + 1])
            piece = with_turn[len(rendered) :]
            if messages[turn]["role"] == "assistant":
                header = self.processor.apply_chat_template(messages[:turn], add_generation_prompt=True)[
                    len(rendered) :
                ]
                body = piece[len(header) :]
                answer = body.rstrip("\n")
                segments += [(header, False), (answer, True), (body[len(answer) :], False)]
            else:
                segments.append((piece, False))
            rendered = with_turn
        return segments

    def generation_segments(self, text: str, with_image: bool) -> list[tuple[str, bool]]:
        """A user turn asking for an image, and the assistant's image block (its placeholders unlabelled)."""
        prompt = self.processor.generation_prompt(text, with_image)
        opening = GEN_START_TOKEN + VISION_START_TOKEN
        return [
            (prompt[: -len(opening)], False),
            (opening, True),
            (GEN_TOKEN, False),
            (VISION_END_TOKEN, False),
            (CHAT_TOKENS[1], True),
            ("\n", False),
        ]

    def tokenize(
        self, rows: list[list[tuple[str, bool]]], image_sizes: list[int], target_sizes: list[int]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and labels per row; each image placeholder becomes one token per 32x32 cell of its image."""
        tokenizer = self.processor.tokenizer
        image_id, gen_id = self.config.image_token_id, self.config.gen_token_id
        images, gens = iter(image_sizes), iter(target_sizes)
        all_ids, all_labels = [], []
        for segments in rows:
            ids, labels = [], []
            for text, is_label in segments:
                for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    count = next(images) if token == image_id else next(gens) if token == gen_id else 1
                    ids += [token] * count
                    labels += [
                        token if is_label and count == 1 and token not in (image_id, gen_id) else IGNORE_INDEX
                    ] * count
            all_ids.append(ids)
            all_labels.append(labels)
        return all_ids, all_labels

    def seeded_noise(
        self, target_grids: list[list[int]], indices: list[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        noise, timesteps = [], []
        channels = self.config.vae_config["latent_channels"]
        for (rows, cols), index in zip(target_grids, indices):
            generator = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + index)
            noise.append(torch.randn(channels, rows, cols, generator=generator))
            timesteps.append(sample_flow_timesteps(self.config, [rows * cols], generator))
        return noise, torch.cat(timesteps)
