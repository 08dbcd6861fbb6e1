"""The attention and stream rules, checked through what the model computes (eager and sdpa alike)."""

import pytest
import torch
from builders import tiny_model

from emma_hf.testing_utils import image_span, mixed_batch, random_image, random_latent


IMPLEMENTATIONS = ["eager", "sdpa"]


def edit_then_text(config, size=64):
    """Text, a context image, text, a generated image, then more text that must not see the noisy tokens."""
    ids = [5, 6, *image_span(config.image_token_id, config, size, size), 7, 8]
    ids += image_span(config.gen_token_id, config, size, size) + [9, 10]
    image = random_image(size, size, seed=1)
    return torch.tensor([ids]), {"pixel_values": image[None], "vae_pixel_values": image[None]}


def run(model, input_ids, noisy_latents, timesteps=0.4, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, noisy_latents=noisy_latents, timesteps=torch.tensor([timesteps]), **kwargs)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_noisy_gen_tokens_never_change_text_or_context(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    config = model.config
    input_ids, images = edit_then_text(config)
    first = run(model, input_ids, random_latent(config, 64, 64, seed=2)[None], **images)
    second = run(model, input_ids, random_latent(config, 64, 64, seed=3)[None], timesteps=0.9, **images)
    not_gen = input_ids[0] != config.gen_token_id
    assert torch.equal(first.logits[0, not_gen], second.logits[0, not_gen])
    assert not torch.allclose(first.velocity, second.velocity)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_later_text_never_changes_earlier_logits(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    config = model.config
    input_ids, images = edit_then_text(config)
    changed = input_ids.clone()
    changed[0, -1] = 99
    latent = random_latent(config, 64, 64, seed=2)[None]
    first, second = run(model, input_ids, latent, **images), run(model, changed, latent, **images)
    assert torch.equal(first.logits[0, :-1], second.logits[0, :-1])
    assert torch.equal(first.velocity, second.velocity)
    assert not torch.allclose(first.logits[0, -1], second.logits[0, -1])

    changed_before_image = input_ids.clone()
    changed_before_image[0, 1] = 98
    third = run(model, changed_before_image, latent, **images)
    assert torch.equal(first.logits[0, :1], third.logits[0, :1])
    assert not torch.allclose(first.velocity, third.velocity)


def perturb_one_token(module, index):
    def hook(_, __, output):
        output = output.clone()
        output[index] += 1.0
        return output

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_every_image_token_sees_every_other_token_of_its_image(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    config = model.config
    input_ids, images = edit_then_text(config, size=96)
    latent = random_latent(config, 96, 96, seed=2)[None]
    base = run(model, input_ids, latent, **images, output_hidden_states=True).hidden_states[1][0]
    image_positions = (input_ids[0] == config.image_token_id).nonzero().flatten()
    gen_positions = (input_ids[0] == config.gen_token_id).nonzero().flatten()
    num_tokens = image_positions.numel()

    # The last token of each image is perturbed; after one layer every token of that image must differ.
    handle = perturb_one_token(model.model.und_adapter, num_tokens - 1)
    context_changed = run(model, input_ids, latent, **images, output_hidden_states=True).hidden_states[1][0]
    handle.remove()
    delta = (context_changed - base).abs().sum(-1)
    assert bool((delta[image_positions] > 0).all())
    assert bool((delta[: image_positions[0]] == 0).all())

    shifted = latent.clone()
    shifted[0, :, -1, -1] += 1.0
    gen_changed = run(model, input_ids, shifted, **images, output_hidden_states=True).hidden_states[1][0]
    delta = (gen_changed - base).abs().sum(-1)
    assert bool((delta[gen_positions] > 0).all())
    assert bool((delta[: gen_positions[0]] == 0).all())
    assert bool((delta[gen_positions[-1] + 1 :] == 0).all())


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_packed_samples_never_see_each_other(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    config = model.config
    first_ids, first_images = edit_then_text(config)
    second_ids = torch.tensor([[40, 41, *image_span(config.gen_token_id, config, 32, 64), 42]])
    first_latent = random_latent(config, 64, 64, seed=2)
    packed_ids = torch.cat([first_ids, second_ids], dim=1)
    segments = torch.cat([torch.ones_like(first_ids), torch.full_like(second_ids, 2)], dim=1)
    length = first_ids.shape[1]

    def packed(second_latent, second_text):
        ids = packed_ids.clone()
        ids[0, length] = second_text
        with torch.no_grad():
            return model(
                input_ids=ids,
                attention_mask=segments,
                noisy_latents=[first_latent, second_latent],
                timesteps=torch.tensor([0.4, 0.6]),
                **first_images,
            )

    a = packed(random_latent(config, 32, 64, seed=4), 40)
    b = packed(random_latent(config, 32, 64, seed=5), 43)
    assert torch.equal(a.logits[0, :length], b.logits[0, :length])
    first_gen_tokens = config.num_image_tokens(64, 64)
    assert torch.equal(a.velocity[:first_gen_tokens], b.velocity[:first_gen_tokens])

    alone_first = run(model, first_ids, first_latent[None], **first_images)
    alone_second = run(model, second_ids, random_latent(config, 32, 64, seed=4)[None], timesteps=0.6)
    assert torch.allclose(a.logits[0, :length], alone_first.logits[0], atol=1e-5)
    assert torch.allclose(a.logits[0, length:], alone_second.logits[0], atol=1e-5)
    assert torch.allclose(a.velocity[first_gen_tokens:], alone_second.velocity, atol=1e-5)


def test_eager_and_sdpa_agree_on_a_mixed_batch():
    batch = mixed_batch(tiny_model().config)
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model = tiny_model(attn_implementation=implementation)
        with torch.no_grad():
            outputs[implementation] = model(**batch)
    eager, sdpa = outputs["eager"], outputs["sdpa"]
    real = batch["attention_mask"].bool()
    assert torch.allclose(eager.logits[real], sdpa.logits[real], atol=1e-5)
    assert torch.allclose(eager.velocity, sdpa.velocity, atol=1e-5)
    assert torch.allclose(eager.loss, sdpa.loss, atol=1e-5)


def test_left_padding_does_not_change_results():
    model = tiny_model()
    config = model.config
    input_ids, images = edit_then_text(config)
    latent = random_latent(config, 64, 64, seed=2)[None]
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(input_ids)], dim=1)
    plain = run(model, input_ids, latent, **images)
    padded = run(model, padded_ids, latent, attention_mask=mask, **images)
    assert torch.allclose(plain.logits, padded.logits[:, 3:], atol=1e-5)
    assert torch.allclose(plain.velocity, padded.velocity, atol=1e-5)
