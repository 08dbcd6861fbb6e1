"""One optimiser step on a mixed batch trains both streams and leaves the DC-AE alone."""

import math

import pytest
import torch
from builders import tiny_model
from diffusers import FlowMatchEulerDiscreteScheduler

from emma_hf.modeling_emma import PART_PATHS, TokenStreams
from emma_hf.testing_utils import mixed_batch


def test_mixed_batch_step_trains_both_streams_not_the_vae():
    model = tiny_model(vision_router_mode="soft").train()
    batch = mixed_batch(model.config)
    vae_before = {name: p.clone() for name, p in model.model.vae.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    output = model(**batch)
    assert torch.isfinite(output.loss) and torch.isfinite(output.ce_loss) and torch.isfinite(output.fm_loss)
    assert torch.allclose(output.loss, output.ce_loss + output.fm_loss)
    output.loss.backward()

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("model.vae.") for name in trainable)
    without_gradient = [name for name, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert without_gradient == []
    assert any(".gen." in name for name in trainable) and any(".mlp.experts.1." in name for name in trainable)
    assert all(p.grad is None for p in model.model.vae.parameters())

    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(p, vae_before[name]) for name, p in model.model.vae.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_loss_weights_and_labels_on_placeholders():
    model = tiny_model(ce_weight=0.25, fm_weight=2.0)
    batch = mixed_batch(model.config)
    with torch.no_grad():
        output = model(**batch)
        assert torch.allclose(output.loss, 0.25 * output.ce_loss + 2.0 * output.fm_loss)
        # Labelling placeholders is the same as ignoring them: they are never next-token targets.
        labels_on_everything = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        placeholder = (labels_on_everything == model.config.image_token_id) | (
            labels_on_everything == model.config.gen_token_id
        )
        with_placeholders = model(**{**batch, "labels": labels_on_everything}).ce_loss
        without = model(**{**batch, "labels": labels_on_everything.masked_fill(placeholder, -100)}).ce_loss
    assert torch.equal(with_placeholders, without)


def test_flow_matching_target_is_noise_minus_x0():
    model = tiny_model()
    batch = mixed_batch(model.config)
    with torch.no_grad():
        output = model(**batch)
        x0, noise, t = batch["target_latents"], batch["noise"], batch["timesteps"]
        noisy = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        direct = model(**{k: v for k, v in batch.items() if k not in ("target_latents", "noise")}, noisy_latents=noisy)
    target = torch.cat([(n - x).flatten(1).T for x, n in zip(x0, noise)])
    assert torch.allclose(output.velocity, direct.velocity, atol=1e-6)
    assert torch.allclose(output.fm_loss, torch.nn.functional.mse_loss(direct.velocity, target), atol=1e-6)


def test_sampled_timesteps_follow_the_resolution_shift():
    model = tiny_model()
    torch.manual_seed(0)
    small = model.sample_timesteps([64] * 4000)
    large = model.sample_timesteps([1024] * 4000)
    assert bool(((small > 0) & (small < 1)).all()) and bool(((large > 0) & (large < 1)).all())
    assert large.median() > small.median() > 0.5


@pytest.mark.parametrize("side, shift", [(256, 1.6487), (512, 1.8776), (1024, 3.1582)])
def test_the_shift_depends_on_pixels_as_flux_does_on_16_pixel_tokens(side, shift):
    """EMMA's 32-px tokens: the same image sizes as FLUX's 256 and 4096 16-px tokens anchor the schedule."""
    config = tiny_model().config
    assert abs(config.flow_shift_for(config.num_image_tokens(side, side)) - shift) < 1e-4
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)  # diffusers' FLUX defaults: 256 -> 4096 tokens
    slope = (flux.config.max_shift - flux.config.base_shift) / (4096 - 256)
    flux_mu = flux.config.base_shift + slope * ((side // 16) ** 2 - 256)
    assert abs(math.exp(flux_mu) - shift) < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = mixed_batch(tiny_model().config)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(vision_router_mode="soft").train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
        model(**batch).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradient, gradients[1][name], atol=1e-6), name


def test_stream_routing_matches_a_per_token_choice_forward_and_backward():
    """Index routing (a permutation with an exact inverse-gather gradient) equals picking each token's module."""
    torch.manual_seed(0)
    und, gen = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    gen_mask = torch.rand(3, 7) < 0.4
    x = torch.randn(3, 7, 8, requires_grad=True)
    routed = TokenStreams(gen_mask).apply(und, gen, x)
    reference = torch.where(gen_mask[..., None], gen(x), und(x))
    torch.testing.assert_close(routed, reference, rtol=0, atol=0)
    upstream = torch.randn_like(routed)
    grads = torch.autograd.grad(routed, [x, *und.parameters(), *gen.parameters()], upstream)
    expected = torch.autograd.grad(reference, [x, *und.parameters(), *gen.parameters()], upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


LITERAL = {
    "shallow_decoupled_modules": [],
    "deep_decoupled_modules": ["v_proj", "o_proj", "post_attention_layernorm", "mlp"],
}


@pytest.mark.parametrize(
    "decoupling",
    [{}, LITERAL, {"shallow_decoupled_modules": ["q_proj", "k_proj"], "deep_decoupled_modules": []}],
    ids=["default", "literal", "qk-shallow-only"],
)
def test_each_decoupling_trains_one_step_with_its_own_parameters(decoupling):
    """Each reading of shared-and-decoupled holds gen copies exactly where configured, and every weight learns."""
    model = tiny_model(num_shallow_layers=2, vision_router_mode="soft", **decoupling).train()
    config = model.config
    for index, layer in enumerate(model.model.language_model.layers):
        chosen = config.shallow_decoupled_modules if index < 2 else config.deep_decoupled_modules
        expected = {
            f"{PART_PATHS[name]}.{parameter}"
            for name in chosen
            for parameter, _ in layer.get_submodule(PART_PATHS[name]).named_parameters()
        }
        assert {name for name, _ in layer.gen.named_parameters()} == expected, index
    model(**mixed_batch(config)).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert [name for name, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)] == []
