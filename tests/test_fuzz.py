"""
Fuzzing the three ways hostile input comes in: random JSONL rows, random bytes and arrays as images, and random
pipeline arguments. Each must give a correct result or a clear error of the documented kinds, raised by emma_hf
(never an exception from deep inside PIL, torch or diffusers, nor a silently wrong result).
"""

import json
import math
import random
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import tiny_chat_model, tiny_processor, write_toy_dataset

import emma_hf
from emma_hf import EmmaPipeline
from emma_hf.training import EmmaCollator, JsonlDataset
from emma_hf.training.data import DataError, EmmaSample


EMMA_SOURCE = str(Path(emma_hf.__file__).parent)
VALID_ROWS = {
    "understanding": {
        "images": ["images/red.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Red."},
        ],
    },
    "text_to_image": {"prompt": "Draw a red square.", "image": "images/red.png"},
    "edit": {"image": "images/red.png", "instruction": "Make it blue.", "target": "images/blue.png"},
}


def random_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str", "path"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        keys = ["role", "content", "type", "text", "image", "x"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return {
        "null": None,
        "bool": rng.random() < 0.5,
        "int": rng.randint(-5, 5),
        "float": rng.choice([0.5, math.inf, -1e300]),
        "str": rng.choice(["", "hi", "<|im_end|>", "\ud800", "../../etc/passwd", "images"]),
        "path": rng.choice(["images/red.png", "images/missing.png", "images", "/dev/null"]),
    }[kind]


def mutate(rng: random.Random, value):
    """`value` with one random part replaced, removed or extended."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(sorted(value))
        changed = dict(value)
        action = rng.random()
        if action < 0.3:
            del changed[key]
        elif action < 0.6:
            changed[key] = random_json(rng)
        else:
            changed[key] = mutate(rng, value[key])
        return changed
    if isinstance(value, list) and value and rng.random() < 0.7:
        changed = list(value)
        index = rng.randrange(len(changed))
        changed[index] = mutate(rng, changed[index]) if rng.random() < 0.5 else random_json(rng)
        return changed
    return random_json(rng)


def random_line(rng: random.Random, task: str) -> bytes:
    choice = rng.random()
    if choice < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))).replace(b"\n", b"")
    if choice < 0.15:
        return json.dumps(VALID_ROWS[task]).encode()[: rng.randint(1, 30)]
    return json.dumps(mutate(rng, VALID_ROWS[task])).encode("utf-8", "surrogatepass")


def test_random_jsonl_rows_give_a_checked_sample_or_a_located_data_error(tmp_path):
    write_toy_dataset(tmp_path)
    model, processor = tiny_chat_model()
    collator = EmmaCollator(processor, model.config, noise_seed=0)
    rng = random.Random(0)
    outcomes = {"sample": 0, "error": 0}
    for trial in range(240):
        task = list(VALID_ROWS)[trial % 3]
        path = tmp_path / "fuzz.jsonl"
        path.write_bytes(random_line(rng, task) + b"\n" + json.dumps(VALID_ROWS[task]).encode() + b"\n")
        try:
            sample = JsonlDataset(path, task)[0]
        except DataError as error:
            assert str(error).startswith(f"{path}:1: "), error
            outcomes["error"] += 1
            skipped = JsonlDataset(path, task, on_error="skip")[0]
            assert skipped["where"] == f"{path}:2"
        else:
            outcomes["sample"] += 1
            assert isinstance(sample, EmmaSample) and sample["task"] == task
            batch = collator([EmmaSample({**sample, "index": 0})])
            assert batch["input_ids"].shape[0] == 1
    assert outcomes["error"] > 150 and outcomes["sample"] > 5, outcomes


def test_random_bytes_and_arrays_as_images_give_pixels_or_a_clear_error(tmp_path):
    image_processor = tiny_processor().image_processor
    rng = np.random.default_rng(0)
    png_header = b"\x89PNG\r\n\x1a\n"
    for trial in range(150):
        path = tmp_path / f"fuzz{trial}.png"
        body = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        path.write_bytes((png_header if trial % 2 else b"") + body)
        with pytest.raises(ValueError, match="fuzz"):
            image_processor(path)
    dtypes = [np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_, np.complex64]
    for _ in range(150):
        shape = tuple(int(side) for side in rng.integers(0, 7, int(rng.integers(1, 5))))
        array = (rng.random(shape) * rng.choice([1, 2, 300])).astype(rng.choice(dtypes))
        try:
            pixels = image_processor(array, return_tensors="pt")["vae_pixel_values"]
        except (ValueError, TypeError) as error:
            assert traceback.extract_tb(error.__traceback__)[-1].filename.startswith(EMMA_SOURCE), repr(error)
        else:
            assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.shape[1] == 3 * 32 * 32


@pytest.fixture(scope="module")
def pipe() -> EmmaPipeline:
    pipeline = EmmaPipeline.from_model(*tiny_chat_model(seed=3))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


BAD_VALUES = [None, -1, 0, 1.5, float("nan"), float("inf"), "x", "", [], {}, [1.0], object(), np.float32(2.0), True]
ARGUMENTS = [
    "prompt",
    "image",
    "negative_prompt",
    "height",
    "width",
    "num_inference_steps",
    "timesteps",
    "sigmas",
    "guidance_scale",
    "image_guidance_scale",
    "guidance_interval",
    "guidance_renorm_min",
    "num_images_per_prompt",
    "generator",
    "latents",
    "output_type",
    "return_dict",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "attention_kwargs",
]


def test_random_pipeline_arguments_give_an_image_or_a_clear_error(pipe):
    rng = random.Random(0)
    outcomes = {"image": 0, "error": 0}
    for _ in range(160):
        arguments = {"prompt": "a red circle", "height": 32, "width": 32, "num_inference_steps": 2}
        for name in rng.sample(ARGUMENTS, rng.randint(1, 2)):
            arguments[name] = rng.choice(BAD_VALUES)
        try:
            output = pipe(**arguments, output_type="pt") if "output_type" not in arguments else pipe(**arguments)
        except (ValueError, TypeError, FileNotFoundError) as error:
            origin = traceback.extract_tb(error.__traceback__)[-1].filename
            assert origin.startswith(EMMA_SOURCE), f"{arguments}: {error!r} raised from {origin}"
            outcomes["error"] += 1
        else:
            images = output[0] if isinstance(output, tuple) else output.images
            assert len(images) >= 1
            if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3:
                assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
            outcomes["image"] += 1
    assert outcomes["error"] > 100 and outcomes["image"] > 5, outcomes
