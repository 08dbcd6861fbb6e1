"""
Hand-built EMMA inputs for tests and benchmarks: token spans with image placeholders, random images and latents,
a mixed batch of all three tasks and a batch of edits; the quantisation settings tests and benchmarks compare. No
tokenizer or data files needed.
"""

import torch

from .configuration_emma import EmmaConfig


def image_span(token_id: int, config: EmmaConfig, height: int, width: int) -> list[int]:
    """Vision start, one placeholder per 32x32 cell, vision end."""
    return [
        config.vision_start_token_id,
        *[token_id] * config.num_image_tokens(height, width),
        config.vision_end_token_id,
    ]


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=generator) * 2 - 1


def random_latent(config: EmmaConfig, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    cell = config.image_grid_size
    return torch.randn(config.vae_config["latent_channels"], height // cell, width // cell, generator=generator)


def mixed_batch(config: EmmaConfig, size: int = 64) -> dict:
    """A question about an image, a text-to-image sample and an edit, right-padded, with labels and FM inputs."""
    question = [11, 12, *image_span(config.image_token_id, config, size, size), 13, 14, 15, 16, 17]
    question_labels = [-100] * (len(question) - 3) + question[-3:]
    t2i = [21, 22, 23, *image_span(config.gen_token_id, config, size, size)]
    edit = [
        31,
        *image_span(config.image_token_id, config, size, size),
        32,
        33,
        *image_span(config.gen_token_id, config, size, size),
    ]
    rows = [question, t2i, edit]
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels[0, : len(question)] = torch.tensor(question_labels)
    images = torch.stack([random_image(size, size, 1), random_image(size, size, 2)])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": images,
        "vae_pixel_values": images,
        "target_latents": torch.stack([random_latent(config, size, size, 3), random_latent(config, size, size, 4)]),
        "noise": torch.stack([random_latent(config, size, size, 5), random_latent(config, size, size, 6)]),
        "timesteps": torch.tensor([0.3, 0.7]),
    }


def edit_batch(config: EmmaConfig, size: int, rows: int) -> dict:
    """`rows` edits at `size`x`size` (context image in, image out), the generation preset's training sample."""
    row = [
        31,
        *image_span(config.image_token_id, config, size, size),
        32,
        33,
        *image_span(config.gen_token_id, config, size, size),
    ]
    images = torch.stack([random_image(size, size, seed) for seed in range(rows)])
    return {
        "input_ids": torch.tensor([row] * rows),
        "attention_mask": torch.ones(rows, len(row), dtype=torch.long),
        "pixel_values": images,
        "vae_pixel_values": images,
        "target_latents": torch.stack([random_latent(config, size, size, 100 + i) for i in range(rows)]),
        "noise": torch.stack([random_latent(config, size, size, 200 + i) for i in range(rows)]),
        "timesteps": torch.linspace(0.2, 0.8, rows),
    }


QUANTIZATIONS = ("bnb-8bit", "bnb-4bit", "torchao-int8")


def quantization_config(name: str):
    """transformers' quantisation config for `name` in `QUANTIZATIONS`, every setting at the library's default."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantisation {name!r}; use one of {QUANTIZATIONS}")
    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True) if name == "bnb-8bit" else BitsAndBytesConfig(load_in_4bit=True)
