"""Checkpoints, Auto classes, devices and dtypes, and chat generation with images in the prompt."""

import pytest
import torch
from builders import tiny_model
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText

from emma_hf import EmmaForConditionalGeneration, EmmaModel
from emma_hf.testing_utils import image_span, mixed_batch, random_image


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(seed=3)
    batch = mixed_batch(model.config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert any(key.startswith("model.vae.encoder.") for key in keys)
    assert "model.language_model.layers.3.gen.mlp.gate_proj.weight" in keys

    loaded = EmmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert type(auto) is EmmaForConditionalGeneration and type(backbone) is EmmaModel
    with torch.no_grad():
        expected = model(**batch)
        for other in (loaded, auto):
            output = other(**batch)
            assert torch.equal(output.logits, expected.logits) and torch.equal(output.velocity, expected.velocity)
        backbone_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "vae_pixel_values")}
        hidden = backbone(**backbone_inputs, noisy_latents=batch["target_latents"], timesteps=batch["timesteps"])
    assert hidden.last_hidden_state.shape[:2] == batch["input_ids"].shape


def test_device_map_and_meta_initialisation(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    batch = mixed_batch(model.config)
    mapped = EmmaForConditionalGeneration.from_pretrained(tmp_path, device_map="cpu").eval()
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(mapped(**batch).velocity, model(**batch).velocity)
    with torch.device("meta"):
        empty = EmmaForConditionalGeneration(model.config)
    assert all(p.is_meta for p in empty.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite_and_close(dtype):
    model = tiny_model(seed=5)
    batch = mixed_batch(model.config)
    with torch.no_grad():
        reference = model(**batch)
        half = model.to(dtype)(**batch)
    assert half.logits.dtype == dtype
    assert torch.isfinite(half.logits).all() and torch.isfinite(half.velocity).all() and torch.isfinite(half.loss)
    assert torch.allclose(half.velocity.float(), reference.velocity, atol=0.15)
    assert abs(half.loss.item() - reference.loss.item()) < 0.1


def chat_prompts(config):
    first = random_image(64, 64, seed=7)
    second = random_image(32, 96, seed=8)
    one_image = [1, 2, *image_span(config.image_token_id, config, 64, 64), 3, 4]
    two_images = [
        5,
        *image_span(config.image_token_id, config, 64, 64),
        6,
        *image_span(config.image_token_id, config, 32, 96),
        7,
    ]
    return [one_image, two_images], [[first], [first, second]]


def left_pad(rows):
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


def test_generate_with_images_cached_uncached_and_batched():
    model = tiny_model(seed=6)
    rows, images = chat_prompts(model.config)
    singles = []
    for row, row_images in zip(rows, images):
        input_ids = torch.tensor([row])
        kwargs = {"pixel_values": row_images, "vae_pixel_values": row_images, "max_new_tokens": 6, "do_sample": False}
        cached = model.generate(input_ids, **kwargs)
        uncached = model.generate(input_ids, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        singles.append(cached[0, len(row) :])

    input_ids, attention_mask = left_pad(rows)
    flat_images = [image for row_images in images for image in row_images]
    batched = model.generate(
        input_ids,
        attention_mask=attention_mask,
        pixel_values=flat_images,
        vae_pixel_values=flat_images,
        max_new_tokens=6,
        do_sample=False,
    )
    for i, single in enumerate(singles):
        assert torch.equal(batched[i, input_ids.shape[1] :], single)


def test_cached_velocity_equals_the_full_forward():
    model = tiny_model(seed=9)
    config = model.config
    source = random_image(64, 96, seed=10)
    prompt = [1, *image_span(config.image_token_id, config, 64, 96), 2, 3, config.vision_start_token_id]
    gen_tokens = [config.gen_token_id] * config.num_image_tokens(64, 64) + [config.vision_end_token_id]
    noisy = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(11))
    timesteps = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        context = model.encode_context(
            torch.tensor([prompt, prompt]), pixel_values=[source, source], vae_pixel_values=[source, source]
        )
        cached = model.predict_velocity(noisy, timesteps, context)
        again = model.predict_velocity(noisy, timesteps, context)
        full = model(
            input_ids=torch.tensor([prompt + gen_tokens] * 2),
            pixel_values=[source, source],
            vae_pixel_values=[source, source],
            noisy_latents=noisy,
            timesteps=timesteps,
        ).velocity
    assert torch.equal(cached, again)
    assert torch.allclose(cached.permute(0, 2, 3, 1).reshape(-1, 32), full, atol=1e-5)
    with pytest.raises(ValueError, match="batch 1 but the context was encoded for 2"):
        model.predict_velocity(noisy[:1], 0.5, context)
