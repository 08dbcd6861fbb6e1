"""
The shapes world's DC-AE: a small diffusers `AutoencoderDC` (32x downsampling, 32 latent channels) trained to
reconstruct rendered scenes with the transformers `Trainer` (L1 + MSE on pixels in [-1, 1]).
"""

import os
import random

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderDC
from torch import nn
from torch.utils.data import Dataset

from .checker import detect, signature
from .world import random_scene, render


SHAPES_DC_AE_CONFIG = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 16,
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "ResBlock", "ResBlock", "ResBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "ResBlock", "ResBlock", "ResBlock"],
    "encoder_block_out_channels": [8, 16, 32, 64, 128, 128],
    "decoder_block_out_channels": [8, 16, 32, 64, 128, 128],
    "encoder_layers_per_block": [1, 1, 1, 1, 1, 1],
    "decoder_layers_per_block": [1, 1, 1, 1, 1, 1],
    "encoder_qkv_multiscales": [[], [], [], [], [], []],
    "decoder_qkv_multiscales": [[], [], [], [], [], []],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 1.0,
}


def to_unit_range(image) -> torch.Tensor:
    """A PIL image as a (3, H, W) tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class RenderedScenes(Dataset):
    """Random scenes rendered on the fly; item `i` is always the same scene for a given seed."""

    def __init__(self, num_scenes: int, seed: int, canvas: int = 128):
        self.num_scenes, self.seed, self.canvas = num_scenes, seed, canvas

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        return {"pixel_values": to_unit_range(render(random_scene(rng, self.canvas)))}


class AutoencoderReconstruction(nn.Module):
    """The autoencoder with a reconstruction loss, in the shape the `Trainer` expects."""

    def __init__(self, autoencoder: AutoencoderDC):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, pixel_values: torch.Tensor) -> dict:
        reconstruction = self.autoencoder(pixel_values).sample
        loss = (reconstruction - pixel_values).abs().mean() + ((reconstruction - pixel_values) ** 2).mean()
        return {"loss": loss, "reconstruction": reconstruction}


def latent_scaling_factor(autoencoder: AutoencoderDC, dataset: Dataset, num_samples: int = 256) -> float:
    """1 / std of the latents, so that scaled latents have unit variance like the flow-matching noise."""
    with torch.no_grad():
        images = torch.stack([dataset[i]["pixel_values"] for i in range(min(num_samples, len(dataset)))])
        return float(1.0 / autoencoder.encode(images).latent.std())


def train_autoencoder(
    output_dir: str,
    max_steps: int = 2500,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    canvas: int = 96,
    seed: int = 0,
    resume: bool = False,
) -> AutoencoderDC:
    """
    Train the shapes DC-AE on freshly rendered scenes; save it (with its latent scaling factor) to `output_dir/final`.
    With `resume`, training continues from the last checkpoint in `output_dir`, if any.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    torch.manual_seed(seed)
    autoencoder = AutoencoderDC(**SHAPES_DC_AE_CONFIG)
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=100,
        weight_decay=0.0,
        logging_steps=50,
        save_steps=500,
        save_total_limit=1,
        seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    scenes = RenderedScenes(max_steps * batch_size, seed, canvas)
    checkpoint = get_last_checkpoint(output_dir) if resume and os.path.isdir(output_dir) else None
    trainer = Trainer(model=AutoencoderReconstruction(autoencoder), args=arguments, train_dataset=scenes)
    trainer.train(resume_from_checkpoint=checkpoint)
    autoencoder.register_to_config(
        scaling_factor=latent_scaling_factor(autoencoder.eval(), RenderedScenes(256, seed + 1, canvas))
    )
    autoencoder.save_pretrained(f"{output_dir}/final")
    return autoencoder


@torch.no_grad()
def reconstruction_pass_rate(
    autoencoder: AutoencoderDC, num_scenes: int = 200, seed: int = 99000, canvas: int = 96
) -> float:
    """
    The share of random scenes whose reconstruction the checker reads back as the scene: the ceiling the DC-AE puts
    on every drawn or edited image.
    """
    passed = 0
    for index in range(num_scenes):
        image = render(random_scene(random.Random(seed * 1_000_003 + index), canvas))
        reconstruction = autoencoder(to_unit_range(image)[None].to(autoencoder.dtype)).sample[0].float()
        pixels = ((reconstruction.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        passed += signature(detect(PIL.Image.fromarray(pixels))) == signature(detect(image))
    return passed / num_scenes
