"""
Fast decoding and flex attention: a static cache gives the dynamic cache's tokens, its one-token decode step compiles
as one graph (`fullgraph=True`) that gives the eager tokens, and flex attention runs EMMA's masks as a `BlockMask`
with sdpa's numbers.
"""

import copy

import pytest
import torch
from builders import noise_image, tiny_chat_model, tiny_model
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_mask
from transformers import CompileConfig, StaticCache

from emma_hf import EmmaForConditionalGeneration
from emma_hf.modeling_emma import CACHE_NAME, KeyLayout, find_image_blocks
from emma_hf.testing_utils import image_span, random_image, random_latent


GREEDY = {
    "max_new_tokens": 6,
    "do_sample": False,
    "eos_token_id": None,
    "output_scores": True,
    "return_dict_in_generate": True,
}


def chat_batch(processor) -> dict:
    """A question about an image and a text-only question of another length, left-padded into one batch."""
    messages = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": noise_image(70, 50, 0)}, {"type": "text", "text": "What?"}],
            }
        ],
        [{"role": "user", "content": "Describe the picture in one sentence, please."}],
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def assert_same_generation(actual, expected) -> None:
    assert torch.equal(actual.sequences, expected.sequences)
    for actual_step, expected_step in zip(actual.scores, expected.scores, strict=True):
        torch.testing.assert_close(actual_step, expected_step, rtol=1e-5, atol=1e-5)


def attention_mask_shapes(model, run) -> list[tuple[int, ...]]:
    """The shape of the attention mask each forward of `run()` receives."""
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["attention_mask"].shape)), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return shapes


def test_static_cache_gives_the_tokens_and_scores_of_the_dynamic_cache():
    model, processor = tiny_chat_model(seed=1)
    batch = chat_batch(processor)
    dynamic = model.generate(**batch, **GREEDY)
    static = model.generate(**batch, **GREEDY, cache_implementation="static")
    cache = getattr(static, CACHE_NAME)
    assert isinstance(cache, StaticCache)
    assert_same_generation(static, dynamic)

    # Every step gets the 2-D mask padded to the cache's room: one shape, so a compiled step never recompiles.
    shapes = attention_mask_shapes(model, lambda: model.generate(**batch, **GREEDY, cache_implementation="static"))
    assert shapes == [(2, cache.layers[0].max_cache_len)] * GREEDY["max_new_tokens"]


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_compiled_decode_step_is_one_graph_and_gives_the_eager_tokens(backend):
    model, processor = tiny_chat_model(seed=1)
    assert model._can_compile_fullgraph
    batch = chat_batch(processor)
    eager = model.generate(**batch, **GREEDY, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on its own on GPUs only
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(**batch, **GREEDY, cache_implementation="static", compile_config=compile_config)
    assert_same_generation(compiled, eager)
    # One graph for all five decode steps (the prompt runs eagerly): no graph break, no recompilation.
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_a_compiled_forward_reads_a_prompt_with_an_image_as_eager_does():
    """`torch.compile(model)` over a whole prompt (images, padding, EMMA's mask), with inductor's CPU code."""
    model, processor = tiny_chat_model(seed=1)
    batch = chat_batch(processor)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**batch).logits
        compiled = torch.compile(model)(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def packed_and_padded(config) -> dict:
    """Row 0: two packed samples (text, context image, gen tokens; text, context image); row 1: left-padded text-to-image."""
    first = [5, 6, *image_span(config.image_token_id, config, 64, 32), 7, 8]
    first += [*image_span(config.gen_token_id, config, 32, 64), 9]
    second = [10, 11, 12, *image_span(config.image_token_id, config, 32, 32), 13]
    other = [14, 15, *image_span(config.gen_token_id, config, 32, 32), 16]
    length = len(first) + len(second)
    input_ids = torch.zeros(2, length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[0] = torch.tensor(first + second)
    attention_mask[0, : len(first)], attention_mask[0, len(first) :] = 1, 2
    input_ids[1, -len(other) :], attention_mask[1, -len(other) :] = torch.tensor(other), 1
    images = [random_image(64, 32, seed=1), random_image(32, 32, seed=2)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": images,
        "vae_pixel_values": images,
        "noisy_latents": [random_latent(config, 32, 64, seed=3), random_latent(config, 32, 32, seed=4)],
        "timesteps": torch.tensor([0.3, 0.7]),
    }


@pytest.mark.parametrize("past_length", [0, 5], ids=["prompt", "after a cache"])
def test_the_flex_block_mask_is_the_dense_mask(past_length):
    config = tiny_model().config
    batch = packed_and_padded(config)
    _, gen_mask, block_ids = find_image_blocks(batch["input_ids"], config)
    # Keys: the cache, the new tokens, then a static cache's unfilled room.
    key_segment_ids = torch.cat(
        [torch.ones(2, past_length, dtype=torch.long), batch["attention_mask"], torch.zeros(2, 7, dtype=torch.long)],
        dim=1,
    )
    layout = KeyLayout.build(gen_mask, block_ids, key_segment_ids, past_length)
    dense = layout.dense()
    block_mask = layout.block_mask()
    from_flex = create_mask(block_mask.mask_mod, *dense.shape[:1], None, *dense.shape[2:], device="cpu")
    assert torch.equal(from_flex, dense)
    # A static cache's count is a tensor while a decode step compiles: the same mask.
    tensor_count = KeyLayout.build(gen_mask, block_ids, key_segment_ids, torch.tensor(past_length))
    assert torch.equal(tensor_count.dense(), dense)
    assert not dense[..., past_length + gen_mask.shape[1] :].any()


def test_flex_attention_gives_the_logits_and_velocity_of_sdpa():
    sdpa = tiny_model(seed=3)
    flex = EmmaForConditionalGeneration._from_config(
        copy.deepcopy(sdpa.config), attn_implementation="flex_attention"
    ).eval()
    flex.load_state_dict(sdpa.state_dict())
    assert flex.config.text_config._attn_implementation == "flex_attention"
    assert flex.config.vision_config._attn_implementation == "sdpa"  # its mask is padding alone
    batch = packed_and_padded(sdpa.config)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, actual = sdpa(**batch), flex(**batch)
        torch.testing.assert_close(actual.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual.velocity, expected.velocity, rtol=1e-5, atol=1e-5)

        # A denoising step against a cached context: `predict_velocity`'s mask.
        context_ids = torch.arange(20, 40).reshape(2, 10)
        context_mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
        latents = torch.stack([random_latent(sdpa.config, 32, 64, seed=i) for i in (5, 6)])
        velocities = [
            model.predict_velocity(latents, 0.4, model.encode_context(context_ids, context_mask))
            for model in (sdpa, flex)
        ]
    torch.testing.assert_close(velocities[1], velocities[0], rtol=1e-5, atol=1e-5)


def test_flex_attention_decodes_the_tokens_of_sdpa_with_either_cache():
    sdpa, processor = tiny_chat_model(seed=1)
    flex = EmmaForConditionalGeneration._from_config(
        copy.deepcopy(sdpa.config), attn_implementation="flex_attention"
    ).eval()
    flex.load_state_dict(sdpa.state_dict())
    batch = chat_batch(processor)
    expected = sdpa.generate(**batch, **GREEDY)
    assert_same_generation(flex.generate(**batch, **GREEDY), expected)
    assert_same_generation(flex.generate(**batch, **GREEDY, cache_implementation="static"), expected)
