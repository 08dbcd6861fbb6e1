"""
Half precision stays finite: random tiny models over 100 seeds and the shipped model, in bfloat16 and float16, give
no NaN or inf in logits, velocities, losses, latents or decoded images.
"""

import pytest
import torch
from builders import noise_image, tiny_model

from emma_hf import EmmaPipeline
from emma_hf.shipped import shipped_model_path
from emma_hf.testing_utils import mixed_batch


HALF_PRECISION = [torch.bfloat16, torch.float16]
NUM_SEEDS = 100


def half_batch(config, dtype: torch.dtype) -> dict:
    """The mixed batch (question, text-to-image, edit) with its images and latents in `dtype`."""
    batch = mixed_batch(config, size=32)
    return {
        name: value.to(dtype) if value.is_floating_point() and name != "timesteps" else value
        for name, value in batch.items()
    }


@pytest.mark.parametrize("dtype", HALF_PRECISION, ids=str)
@torch.no_grad()
def test_random_tiny_models_stay_finite_in_half_precision(dtype: torch.dtype):
    for seed in range(NUM_SEEDS):
        model = tiny_model(seed=seed).to(dtype)
        outputs = model(**half_batch(model.config, dtype))
        decoded = model.model.vae.decode(outputs.velocity.reshape(2, 1, 1, -1).permute(0, 3, 1, 2)).sample
        context = model.encode_context(torch.tensor([[5, 6, 7]]))
        velocity = model.predict_velocity(torch.randn(1, 32, 2, 2, dtype=dtype), 0.5, context)
        for name, value in (
            ("logits", outputs.logits),
            ("velocity", outputs.velocity),
            ("loss", outputs.loss),
            ("decoded", decoded),
            ("cached velocity", velocity),
        ):
            assert value.dtype == dtype or name == "loss"
            assert torch.isfinite(value).all(), f"seed {seed}: {name} is not finite in {dtype}"


@pytest.fixture(scope="module", params=HALF_PRECISION, ids=str)
def shipped_pipeline(request) -> EmmaPipeline:
    pipe = EmmaPipeline.from_pretrained(str(shipped_model_path()), dtype=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_the_shipped_model_stays_finite_in_half_precision(shipped_pipeline: EmmaPipeline):
    pipe = shipped_pipeline
    dtype = pipe.model.dtype
    drawn = pipe(
        ["a red circle above a blue square", "two green triangles"],
        num_inference_steps=8,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    edited = pipe(
        "make the circle blue",
        image=noise_image(96, 96, 0),
        num_inference_steps=8,
        guidance_scale=4.0,
        image_guidance_scale=2.0,
        output_type="pt",
    ).images
    assert torch.isfinite(drawn).all() and torch.isfinite(edited).all()
    assert drawn.std() > 0.01, "the drawings are not blank"

    messages = [
        {"role": "user", "content": [{"type": "image", "image": noise_image(96, 96, 1)}, {"type": "text", "text": q}]}
        for q in ("what color is the circle?", "how many squares are there?")
    ]
    inputs = pipe.processor.apply_chat_template(
        [[message] for message in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    generated = pipe.model.generate(
        **inputs, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    scores = torch.stack(generated.scores)
    assert scores.dtype in (dtype, torch.float32)
    assert torch.isfinite(scores).all()
