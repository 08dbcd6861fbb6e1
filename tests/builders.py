"""Tiny EMMA models, a tiny tokenizer and processor, and hand-built token sequences."""

import json

import torch

from emma_hf import EmmaConfig, EmmaForConditionalGeneration
from emma_hf.modeling_emma import unpack_images


def tiny_config(**overrides) -> EmmaConfig:
    return EmmaConfig.from_preset("tiny", **overrides)


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> EmmaForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    return EmmaForConditionalGeneration(config).eval()


CORPUS = [
    "What colour is the square? The square is red.",
    "How many circles are there? There are two circles.",
    "Draw a blue triangle on the left. Make the circle green.",
    "Describe the picture in one sentence, please.",
]


def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences, wrapped as Qwen3's tokenizer class (without EMMA's tokens)."""
    from emma_hf.shapes.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def tiny_processor(max_pixels: int = 96 * 96):
    """EmmaProcessor over `tiny_tokenizer()` (EMMA's tokens get added) with a small pixel budget."""
    from emma_hf import EmmaImageProcessor, EmmaProcessor

    image_processor = EmmaImageProcessor(size={"min_pixels": 32 * 32, "max_pixels": max_pixels})
    return EmmaProcessor(image_processor, tiny_tokenizer())


def tiny_chat_model(seed: int = 0, **overrides):
    """A tiny model and processor whose token ids agree (written into the config as an export does)."""
    from emma_hf.hub import sync_special_tokens

    model, processor = tiny_model(seed=seed, **overrides), tiny_processor()
    sync_special_tokens(model, processor)
    return model, processor


def noise_image(height: int, width: int, seed: int, mode: str = "RGB"):
    """A PIL image of uniform noise."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


HIDE_EMMA_HF = """
import importlib.abc, sys


class RefuseEmmaHf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "emma_hf" or name.startswith("emma_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden for this test)")
        return None


sys.meta_path.insert(0, RefuseEmmaHf())


def emma_hf_importable():
    try:
        import emma_hf  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True
"""


def run_python_without_emma_hf(script: str, args: list[str], workdir, hf_home) -> dict:
    """
    Run `script` in a fresh interpreter where `emma_hf` cannot be imported, offline, with its own HF_HOME, no
    PYTHON* settings and `workdir` as cwd; return the JSON object its last output line holds.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON", "TRANSFORMERS"))
    }
    environment.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "TOKENIZERS_PARALLELISM": "false"})
    path = Path(workdir) / "script_without_emma_hf.py"
    path.write_text(HIDE_EMMA_HF + script)
    result = subprocess.run(
        [sys.executable, str(path), *args], cwd=workdir, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def square_image(colour: str, size: int = 64):
    """A white picture with one coloured square in the middle."""
    import PIL.Image

    image = PIL.Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(COLOURS[colour], (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def write_toy_dataset(folder, size: int = 64) -> dict:
    """Tiny JSONL files of each task (coloured squares: questions, drawings, recolouring) and their images."""
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        square_image(colour, size).save(folder / "images" / f"{colour}.png")
    understanding = [
        {
            "images": [f"images/{colour}.png"],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}],
                },
                {"role": "assistant", "content": f"The square is {colour}."},
            ],
        }
        for colour in COLOURS
    ]
    text_to_image = [{"prompt": f"Draw a {colour} square.", "image": f"images/{colour}.png"} for colour in COLOURS]
    edit = [
        {
            "image": f"images/{source}.png",
            "instruction": f"Make the square {target}.",
            "target": f"images/{target}.png",
        }
        for source in COLOURS
        for target in COLOURS
        if source != target
    ]
    paths = {}
    for task, records in (("understanding", understanding), ("text_to_image", text_to_image), ("edit", edit)):
        paths[task] = folder / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(record) + "\n" for record in records))
    return paths


def images_of(inputs, name: str = "vae_pixel_values", patch_size: int = 32) -> list[torch.Tensor]:
    """A processor output's packed `name` as its `(3, H, W)` images."""
    return unpack_images(inputs[name], inputs["image_grid_hw"], patch_size, name)
