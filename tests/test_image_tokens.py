"""32x everywhere: an H x W image is (H/32)*(W/32) tokens in both encoders, so a 512^2 edit costs 512 tokens."""

import pytest
import torch
from builders import tiny_model

from emma_hf.modeling_emma import sincos_2d
from emma_hf.testing_utils import image_span, random_image, random_latent


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 96), (512, 512), (256, 512)])
def test_context_and_gen_token_counts(model, height, width):
    config = model.config
    expected = (height // 32) * (width // 32)
    assert config.num_image_tokens(height, width) == expected
    image = random_image(height, width, seed=0)
    with torch.no_grad():
        (context_tokens,) = model.model.get_image_features(image[None], image[None]).pooler_output
        (latent,) = model.model.encode_latents(image[None])
        (gen_tokens,) = model.model.embed_noisy_latents(latent[None], torch.tensor([0.5]))
    assert context_tokens.shape == (expected, config.text_config.hidden_size)
    assert latent.shape == (config.vae_config["latent_channels"], height // 32, width // 32)
    assert gen_tokens.shape == (expected, config.text_config.hidden_size)


def test_image_position_scale_spreads_the_cells_of_both_streams(model):
    """Same weights, positions 8x further apart: tokens move by the sin-cos difference only, cells grow apart."""
    spread = tiny_model(image_position_scale=8.0)
    spread.load_state_dict(model.state_dict())
    image = random_image(96, 96, seed=0)
    with torch.no_grad():
        latent = model.model.encode_latents(image[None])[0][None]
        context = [m.model.get_image_features(image[None], image[None]).pooler_output[0] for m in (model, spread)]
        gen = [m.model.embed_noisy_latents(latent, torch.tensor([0.5]))[0] for m in (model, spread)]
    hidden = model.config.text_config.hidden_size
    near, far = sincos_2d(3, 3, hidden, "cpu", 1.0).float(), sincos_2d(3, 3, hidden, "cpu", 8.0).float()
    torch.testing.assert_close(context[1] - context[0], far - near, atol=1e-5, rtol=0)
    torch.testing.assert_close(gen[1] - gen[0], far - near, atol=1e-5, rtol=0)
    assert torch.pdist(far).min() > 2.5 * torch.pdist(near).min()


def test_512_edit_uses_512_visual_tokens(model):
    config = model.config
    source = random_image(512, 512, seed=1)
    instruction = [50, 51, 52]
    input_ids = torch.tensor(
        [
            [
                *image_span(config.image_token_id, config, 512, 512),
                *instruction,
                *image_span(config.gen_token_id, config, 512, 512),
            ]
        ]
    )
    visual = (input_ids == config.image_token_id) | (input_ids == config.gen_token_id)
    assert int(visual.sum()) == 512
    with torch.no_grad():
        output = model(
            input_ids=input_ids,
            pixel_values=source[None],
            vae_pixel_values=source[None],
            target_latents=random_latent(config, 512, 512, seed=2)[None],
            timesteps=torch.tensor([0.5]),
        )
    assert output.velocity.shape == (256, config.vae_config["latent_channels"])
    assert output.logits.shape[1] == input_ids.shape[1] == 512 + 2 * 2 + len(instruction)


def test_placeholder_count_must_match_the_images():
    model = tiny_model()
    config = model.config
    image = random_image(64, 64, seed=3)
    too_few = torch.tensor(
        [[1, config.vision_start_token_id, *[config.image_token_id] * 3, config.vision_end_token_id]]
    )
    with pytest.raises(ValueError, match=r"runs of \[3\] placeholder tokens .* images of \[4\] tokens"):
        model(input_ids=too_few, pixel_values=image[None], vae_pixel_values=image[None])
    with pytest.raises(ValueError, match="pixel_values is None"):
        model(input_ids=too_few)
    with pytest.raises(ValueError, match="multiples of 32"):
        odd = random_image(48, 64, seed=4)
        model(input_ids=too_few, pixel_values=odd[None], vae_pixel_values=odd[None])
