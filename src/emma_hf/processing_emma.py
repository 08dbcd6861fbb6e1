# Copyright 2026 The emma_hf authors. Licensed under the Apache License, Version 2.0.
"""
EMMA's processor: one image processor that gives every image to both of EMMA's encoders (SigLIP2 and the DC-AE) at
one size, a multiple of 32 so that each 32x32 cell becomes one visual token, and a text processor that expands each
image placeholder to that many tokens inside a Qwen3 chat.
"""

import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
import warnings
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

from .configuration_emma import EmmaConfig, check_not_an_export, clearer_load_error


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

PROCESSOR_CONFIG_NAME = "processor_config.json"
EXIF_ORIENTATION = 0x0112
# Image URLs: the whole download must finish within this many seconds and hold at most this many bytes.
IMAGE_DOWNLOAD_TIMEOUT = 30.0
IMAGE_DOWNLOAD_MAX_BYTES = 64 * 2**20
VALID_IMAGE_TYPES = "a PIL image, a numpy array, a torch tensor, a file path or an http(s) URL"
# Words as `EmmaProcessor.known_words` counts them: runs of letters and digits, lower-cased.
WORD_PATTERN = re.compile(r"[^\W_]+")


class UnknownWordsWarning(UserWarning):
    """A chat or prompt uses words outside the closed vocabulary a checkpoint was trained on (`known_words`)."""


def words_of(text: str) -> list[str]:
    """The words of `text`, lower-cased, in order."""
    return WORD_PATTERN.findall(text.lower())


def check_unicode(text: str, where: str) -> None:
    """Refuse text that no tokenizer can encode: lone surrogates (halves of UTF-16 pairs, e.g. from bad JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} holds {text[error.start : error.end]!r} at position {error.start}, which is not valid Unicode "
            "text (a lone UTF-16 surrogate); fix the text's encoding"
        ) from None


def message_texts(conversation: list) -> list[str]:
    """Every text of a chat (a list of messages) or of a batch of chats, in order."""
    chats = [conversation] if conversation and isinstance(conversation[0], dict) else conversation
    texts = []
    for chat in chats:
        for message in chat:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [
                    item["text"] for item in content if isinstance(item, dict) and isinstance(item.get("text"), str)
                ]
    return texts


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
    """
    Any PIL mode to RGB: transparency over white, 16-bit greyscale (`I;16`, and `I` holding 16-bit levels) scaled to
    8 bits, float greyscale (`F`) read as levels in [0, 1] like float arrays, the rest by PIL.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "F":
        return array_to_pil(np.asarray(image))
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and (levels.min() < 0 or levels.max() > 65535):
            raise ValueError(
                f"mode 'I' images are read as 16-bit levels in [0, 65535]; got values in [{levels.min():.0f}, "
                f"{levels.max():.0f}]: convert the image to 'L' or 'RGB' first"
            )
        image = PIL.Image.fromarray(np.clip(np.round(levels * (255.0 / 65535.0)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """
    `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1, 3, 4, told apart by which side can be the channels (a shape
    where both can is refused); uint8, uint16 or float in [0, 1].
    """
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if first and last:
            raise ValueError(
                f"an image array of shape {tuple(array.shape)} is ambiguous: its first and last sides both look like "
                "channels; pass a PIL image, or an array with height and width other than 1, 3 and 4"
            )
        if first:
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


def download_image(url: str) -> bytes:
    """
    The bytes at an image URL, within `IMAGE_DOWNLOAD_TIMEOUT` seconds for the whole transfer, headers included (a
    silent or trickling server cannot hold the caller: the transfer runs in a daemon thread that is left behind), and
    `IMAGE_DOWNLOAD_MAX_BYTES`. transformers' `load_image` is not used: its timeout bounds each read rather than the
    download, it has no size limit, and it flattens transparency to black.
    """
    outcome = {}

    def fetch() -> None:
        try:
            outcome["data"] = read_url(url)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=fetch, name=f"emma_hf download {url}", daemon=True)
    worker.start()
    worker.join(IMAGE_DOWNLOAD_TIMEOUT)
    if worker.is_alive():
        raise TimeoutError(
            f"downloading {url!r} took longer than {IMAGE_DOWNLOAD_TIMEOUT} s; download it yourself and pass the file"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def read_url(url: str) -> bytes:
    """The body at `url`, at most `IMAGE_DOWNLOAD_MAX_BYTES`; errors name the URL."""
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=IMAGE_DOWNLOAD_TIMEOUT) as response:
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                if size > IMAGE_DOWNLOAD_MAX_BYTES:
                    raise ValueError(f"{url!r} holds more than {IMAGE_DOWNLOAD_MAX_BYTES} bytes, the image size limit")
                chunks.append(chunk)
    except (urllib.error.URLError, OSError) as error:
        if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
            raise TimeoutError(f"{url!r} did not answer within {IMAGE_DOWNLOAD_TIMEOUT} s") from error
        raise OSError(f"could not download {url!r}: {error}") from error
    return b"".join(chunks)


def open_image(source: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file or an http(s) URL, upright as its EXIF orientation says."""
    source = os.fspath(source)
    if source.lower().startswith(("http://", "https://")):
        data = BytesIO(download_image(source))
    elif not os.path.exists(source):
        raise FileNotFoundError(f"image file not found: {source!r}")
    elif not os.path.isfile(source):  # a FIFO or device would block the read
        raise ValueError(f"{source!r} is not a regular file (a folder, FIFO or device); pass an image file")
    else:
        data = source
    try:
        image = PIL.Image.open(data)
        try:
            image.load()
        except BaseException:
            image.close()
            raise
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{source!r} is not an image file PIL can read") from error
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{source!r} has too many pixels to decode safely: {error}") from error
    except OSError as error:
        raise ValueError(f"{source!r} could not be read as an image: {error}") from error
    return upright(image)


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image as its EXIF orientation says it is seen (files, PIL images and training data alike)."""
    try:
        image.load()
    except ValueError as error:
        raise ValueError(f"the PIL image cannot be read ({error}); pass an open image") from error
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image  # already upright: no copy
    return PIL.ImageOps.exif_transpose(image)


def load_rgb_image(image) -> PIL.Image.Image:
    """One image of any accepted kind as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)  # upright already
    elif isinstance(image, PIL.Image.Image):
        image = upright(image)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError("images must not be empty; got a PIL image of size 0")
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        return array_to_pil(image.detach().cpu().float().numpy() if image.is_floating_point() else image.cpu().numpy())
    if isinstance(image, np.ndarray):
        return array_to_pil(image)
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
    image twice: `pixel_values` for SigLIP2 (rescaled by `rescale_factor` then normalised by `image_mean`/`image_std`,
    each step switchable as in every transformers image processor) and `vae_pixel_values` in [-1, 1] for the DC-AE,
    which reads nothing else, plus `image_grid_hw`, the token grid `(H/patch, W/patch)` of each image.

    Accepts PIL images of any mode (transparency is put on white, 16-bit greyscale scaled), numpy arrays
    (`(H, W[, C])`), torch tensors (`(C, H, W)`; a 4-D tensor is a batch), file paths and http(s) URLs; uint8,
    uint16 or float in [0, 1]. Huge images are shrunk to the budget, tiny ones enlarged to it.

    `pixel_values` and `vae_pixel_values` come packed, as Qwen2-VL lays images out: `(sum of h*w, 3*patch*patch)`,
    one row per visual token, each image's tokens row-major, images in order; `image_grid_hw` splits them again.
    One layout for any mix of sizes and counts, so batches (transformers' pipelines, collators) join rows by
    concatenation. The model also takes images unpacked, as `(N, 3, H, W)` or a list of `(3, H, W)`.
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
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
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
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
            scaled = pixels * np.float32(rescale_factor) if do_rescale else pixels
            siglip.append((scaled - mean) / std if do_normalize else scaled)
            vae.append(pixels / 255.0 * 2.0 - 1.0)
            grids.append((height // patch_size, width // patch_size))
        data = {
            "pixel_values": pack_images(siglip, patch_size),
            "vae_pixel_values": pack_images(vae, patch_size),
            "image_grid_hw": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
        }
        return BatchFeature(data, tensor_type=return_tensors)


def pack_images(images: list[np.ndarray], patch_size: int) -> np.ndarray:
    """
    `(C, H, W)` images -> one `(sum of h*w, C*patch*patch)` array: a row per visual token, each image's tokens
    row-major, images in order. One array whatever the sizes, so batches of any image mix concatenate on rows.
    """
    rows = []
    for image in images:
        channels, height, width = image.shape
        cells = image.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
        rows.append(cells.transpose(1, 3, 0, 2, 4).reshape(-1, channels * patch_size * patch_size))
    return np.concatenate(rows) if rows else np.zeros((0, 3 * patch_size * patch_size), dtype=np.float32)


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
    text_kwargs = {"padding": True, "padding_side": "left"}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        known_words: list[str] | None = None,
        **kwargs,
    ):
        if known_words is not None and (
            isinstance(known_words, str) or not all(isinstance(word, str) and word for word in known_words)
        ):
            raise TypeError(f"known_words must be a list of non-empty strings or None, got {known_words!r}")
        # The words a closed-vocabulary checkpoint (the shipped shapes model) was trained on; None: any text.
        self.known_words = None if known_words is None else sorted({word.lower() for word in known_words})
        registered = tokenizer.get_added_vocab()
        missing = [token for token in (*CHAT_TOKENS, *EMMA_SPECIAL_TOKENS.values()) if token not in registered]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        # Generation pads on the left, also where a caller pads with the tokenizer itself (transformers' pipelines).
        tokenizer.padding_side = "left"
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> "EmmaProcessor":
        """`ProcessorMixin.from_pretrained`, with errors that name a missing or damaged file of a local folder."""
        source = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(source, kwargs.get("subfolder") or "")
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, PROCESSOR_CONFIG_NAME)):
            raise OSError(
                f"{source!r} has no {PROCESSOR_CONFIG_NAME} (the image processor's settings); it holds "
                f"{sorted(os.listdir(folder))}: load a folder saved by EmmaProcessor.save_pretrained or an export"
            )
        try:
            return super().from_pretrained(source, *args, **kwargs)
        except (json.JSONDecodeError, OSError) as error:
            clearer = clearer_load_error(source, kwargs.get("subfolder"), error)
            if clearer is None:
                raise
            raise clearer from error

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, refusing an exported folder (whose `processor/` copy would go stale)."""
        check_not_an_export(os.fspath(save_directory), "the processor")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def emma_token_ids(self) -> dict[str, int]:
        """EmmaConfig field -> id of that token in this tokenizer."""
        return {field: self.tokenizer.convert_tokens_to_ids(token) for field, token in EMMA_SPECIAL_TOKENS.items()}

    @property
    def end_of_turn_token_id(self) -> int:
        """`<|im_end|>`: where an assistant turn, hence chat generation, stops."""
        return self.tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1])

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` outside `known_words`, each once, in order (none when `known_words` is None)."""
        if self.known_words is None:
            return []
        known = set(self.known_words)
        return list(dict.fromkeys(word for word in words_of(text) if word not in known))

    def unknown_words_message(self, unknown: list[str]) -> str:
        """What to tell a user whose text holds `unknown` words."""
        listed = ", ".join(repr(word) for word in unknown)
        return (
            f"{listed} {'is' if len(unknown) == 1 else 'are'} outside the words this checkpoint was trained on; "
            f"it knows: {' '.join(self.known_words)}"
        )

    def control_tokens_in(self, text: str) -> list[str]:
        """The tokenizer's special tokens (chat turns, image slots) in `text`: typed by a user, they act as structure."""
        return [token for token in self.tokenizer.all_special_tokens if token in text]

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """
        transformers' chat templating, warning ([`UnknownWordsWarning`]) about words outside `known_words`. Message
        text holding special tokens is refused (it would forge chat turns or image slots), unless
        `sanitize_control_tokens=True` (with `tokenize=True`) has transformers encode them as plain text.
        """
        texts = message_texts(conversation)
        if not kwargs.get("sanitize_control_tokens"):
            for text in texts:
                found = self.control_tokens_in(text)
                if found:
                    raise ValueError(
                        f"a message's text holds {found}, special tokens of EMMA's chat format: typed in a message "
                        "they would forge chat turns or image slots. Remove them, or pass "
                        "sanitize_control_tokens=True (with tokenize=True) to encode them as plain text"
                    )
        unknown = self.unknown_words(" ".join(texts))
        if unknown:
            message = self.unknown_words_message(unknown) + " (it may answer nothing, or draw something else)"
            warnings.warn(message, UnknownWordsWarning, stacklevel=2)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

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
        """
        Text must be valid Unicode; count images as the image processor will (paths unopened, batch tensors split)
        against the placeholders.
        """
        for sample in [text] if isinstance(text, str) else text if isinstance(text, list) else []:
            if isinstance(sample, str):
                check_unicode(sample, "text")
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

    def __call__(self, *args, **kwargs) -> BatchFeature:
        """
        transformers' processing. Text without images comes with empty image inputs (no rows), so that rows with and
        without images batch together (transformers' pipelines need equal keys).
        """
        inputs = super().__call__(*args, **kwargs)
        input_ids = inputs.get("input_ids")
        tensor_type = (
            "pt" if isinstance(input_ids, torch.Tensor) else "np" if isinstance(input_ids, np.ndarray) else None
        )
        if input_ids is not None and "pixel_values" not in inputs:
            empty = pack_images([], self.image_processor.patch_size)
            no_images = {"pixel_values": empty, "vae_pixel_values": empty, "image_grid_hw": np.zeros((0, 2), np.int64)}
            inputs.update(BatchFeature(no_images, tensor_type=tensor_type))
        return inputs

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

__all__ = ["EmmaImageProcessor", "EmmaProcessor", "UnknownWordsWarning"]
