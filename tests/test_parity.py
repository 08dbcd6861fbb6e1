"""EMMA reduces to the libraries it is built from: Qwen3 on text, SigLIP2 with the versatile expert."""

import pytest
import torch
from builders import tiny_model
from transformers import Siglip2VisionModel
from transformers.masking_utils import create_bidirectional_mask

from emma_hf.convert import qwen3_from_emma
from emma_hf.modeling_emma import EmmaVisionMoeEncoderLayer, patchify
from emma_hf.testing_utils import random_image


def randomize_gen_stream(emma, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in emma.model.language_model.layers:
            for parameter in layer.gen.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        emma.model.language_model.gen_norm.weight.copy_(torch.rand(emma.config.text_config.hidden_size) + 0.5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("gen_stream", ["copied", "different"])
def test_text_only_matches_qwen3(attn_implementation, gen_stream):
    emma = tiny_model(seed=1, attn_implementation=attn_implementation)
    if gen_stream == "copied":
        emma.model.initialize_gen_stream_from_und()
    else:
        randomize_gen_stream(emma, seed=2)
    qwen = qwen3_from_emma(emma)
    qwen.config._attn_implementation = attn_implementation

    input_ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    with torch.no_grad():
        emma_logits = emma(input_ids=input_ids, attention_mask=attention_mask).logits
        qwen_logits = qwen(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (emma_logits[real] - qwen_logits[real]).abs().max().item() <= 1e-5

    emma_tokens = emma.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    qwen_tokens = qwen.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(emma_tokens, qwen_tokens)


def test_gen_stream_copies_start_equal_to_und():
    emma = tiny_model(seed=4)
    emma.model.initialize_gen_stream_from_und()
    for layer in emma.model.language_model.layers:
        for name, parameter in layer.gen.named_parameters():
            assert torch.equal(parameter, layer.get_parameter(name))
    shallow = emma.model.language_model.layers[0]
    deep = emma.model.language_model.layers[-1]
    assert {name for name, _ in shallow.gen.named_parameters()} == {"self_attn.v_proj.weight"}
    assert {name for name, _ in deep.gen.named_parameters()} == {
        name for name, _ in deep.named_parameters() if not name.startswith("gen.")
    }


def siglip2_with_emma_weights(emma) -> Siglip2VisionModel:
    siglip = Siglip2VisionModel(emma.config.vision_config).eval()
    tower_state = emma.model.vision_tower.state_dict()
    state = {}
    for key in siglip.state_dict():
        layer_parts = key.split(".")
        is_moe_mlp = key.startswith("encoder.layers.") and int(layer_parts[2]) in emma.config.vision_moe_layers
        if is_moe_mlp and layer_parts[3] == "mlp":
            layer_parts.insert(4, "experts.0")
        state[key] = tower_state[".".join(layer_parts)]
    siglip.load_state_dict(state)
    return siglip


def test_versatile_expert_is_exactly_siglip2():
    emma = tiny_model(seed=5, vision_router_mode="versatile")
    tower = emma.model.vision_tower
    for layer in tower.encoder.layers:
        if isinstance(layer, EmmaVisionMoeEncoderLayer):
            with torch.no_grad():
                for parameter in layer.mlp.experts[1].parameters():
                    parameter.normal_()
    siglip = siglip2_with_emma_weights(emma)

    patch_size = emma.config.vision_config.patch_size
    images = [random_image(64, 96, seed=6), random_image(32, 32, seed=7)]
    patches = [patchify(image, patch_size) for image in images]
    padded = torch.zeros(2, patches[0].shape[0], patches[0].shape[1])
    mask = torch.zeros(2, patches[0].shape[0], dtype=torch.long)
    for i, p in enumerate(patches):
        padded[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    shapes = torch.tensor([[4, 6], [2, 2]])
    with torch.no_grad():
        expected = siglip(pixel_values=padded, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        got = tower(padded, mask, shapes, router_mode="versatile")
    assert torch.equal(got, expected)
    with torch.no_grad():
        stem = tower(padded, mask, shapes, router_mode="stem")
    assert not torch.allclose(stem, expected)


def test_router_modes_pick_one_expert_or_mix():
    emma = tiny_model(seed=8)
    tower = emma.model.vision_tower
    embeddings = torch.randn(3, 5, emma.config.vision_config.hidden_size)
    mask = torch.ones(3, 5, dtype=torch.long)
    top1 = tower.route(embeddings, mask, "top1")
    assert torch.equal(top1.sum(-1), torch.ones(3)) and set(top1.unique().tolist()) <= {0.0, 1.0}
    soft = tower.route(embeddings, mask, "soft")
    assert torch.allclose(soft.sum(-1), torch.ones(3)) and bool((soft > 0).all())
    assert torch.equal(top1.argmax(-1), soft.argmax(-1))
    assert torch.equal(tower.route(embeddings, mask, "stem"), torch.tensor([[0.0, 1.0]] * 3))


def test_the_router_reads_the_hidden_state_entering_the_first_moe_layer_and_learns_top1(monkeypatch):
    emma = tiny_model(seed=9)  # MoE in SigLIP2 layers 1 and 2 of 0-2
    tower = emma.model.vision_tower
    with torch.no_grad():
        for layer in tower.encoder.layers:
            if isinstance(layer, EmmaVisionMoeEncoderLayer):
                for parameter in layer.mlp.experts[1].parameters():
                    parameter.normal_()
    patches = patchify(random_image(64, 64, seed=3), emma.config.vision_config.patch_size)[None]
    mask, shapes = torch.ones(1, patches.shape[1], dtype=torch.long), torch.tensor([[4, 4]])
    seen = {}
    route = tower.route

    def record(hidden_states, patch_mask, mode):
        seen["hidden_states"] = hidden_states.detach().clone()
        return route(hidden_states, patch_mask, mode)

    monkeypatch.setattr(tower, "route", record)
    top1 = tower(patches, mask, shapes, router_mode="top1")
    encoder_mask = create_bidirectional_mask(
        config=tower.config, inputs_embeds=tower.embeddings(patches, shapes), attention_mask=mask
    )
    with torch.no_grad():
        entering = tower.encoder.layers[0](tower.embeddings(patches, shapes), encoder_mask)
    assert torch.allclose(seen["hidden_states"], entering, atol=1e-6)

    # Straight-through top-1: the forward pass is the chosen expert's alone, and the router gets a gradient.
    chosen = "versatile" if route(seen["hidden_states"], mask, "soft").argmax() == 0 else "stem"
    with torch.no_grad():
        assert torch.equal(top1, tower(patches, mask, shapes, router_mode=chosen))
    top1.square().sum().backward()
    assert tower.router.weight.grad is not None and bool(tower.router.weight.grad.abs().sum() > 0)
