"""
The KV cache under the installed transformers' name (`cache` from 5.24, `past_key_values` on 5.23): cached generation
gives the tokens and scores of uncached generation, and a forward continued from a cache equals the full forward.
"""

import pytest
import torch
from builders import tiny_model

from emma_hf.modeling_emma import CACHE_NAME, emma_position_ids
from emma_hf.testing_utils import image_span, random_image


def rows_with_0_1_and_2_images(config):
    """Three prompts of different lengths, left-padded into one batch, and their images in order of appearance."""
    first, second, third = random_image(64, 64, seed=1), random_image(32, 96, seed=2), random_image(64, 32, seed=3)
    rows = [
        [11, 12, 13],
        [14, *image_span(config.image_token_id, config, 64, 64), 15, 16],
        [
            17,
            *image_span(config.image_token_id, config, 32, 96),
            18,
            *image_span(config.image_token_id, config, 64, 32),
        ],
    ]
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    images = [first, second, third]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": images,
        "vae_pixel_values": images,
    }


def tokens_per_forward(model, run):
    """Run `run()` and return the sequence length of every forward call of the model."""
    lengths = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        result = run()
    finally:
        handle.remove()
    return result, lengths


@pytest.mark.parametrize(
    "search", [{"num_beams": 1}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}], ids=str
)
def test_cached_generation_gives_the_tokens_and_scores_of_uncached(search):
    model = tiny_model(seed=4)
    inputs = rows_with_0_1_and_2_images(model.config)
    settings = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    cached, lengths = tokens_per_forward(model, lambda: model.generate(**inputs, **search, **settings))
    uncached = model.generate(**inputs, **search, **settings, use_cache=False)

    # The cache was carried from step to step: after the prompt, each forward reads one new token.
    assert lengths == [inputs["input_ids"].shape[1]] + [1] * (len(cached.scores) - 1)
    assert getattr(cached, CACHE_NAME).get_seq_length() == cached.sequences.shape[1] - 1
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.scores) == len(uncached.scores)
    for cached_step, uncached_step in zip(cached.scores, uncached.scores):
        finite = torch.isfinite(uncached_step)
        assert torch.equal(finite, torch.isfinite(cached_step))
        torch.testing.assert_close(cached_step[finite], uncached_step[finite], rtol=1e-5, atol=1e-5)
    if search["num_beams"] > 1:
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_a_forward_continued_from_the_cache_equals_the_full_forward(argument):
    """`cache=` is transformers' current name; `past_key_values=` is still accepted, as the floor release names it."""
    model = tiny_model(seed=5)
    inputs = rows_with_0_1_and_2_images(model.config)
    full_ids = torch.cat([inputs["input_ids"], torch.tensor([[21, 22]] * 3)], dim=1)
    full_mask = torch.cat([inputs["attention_mask"], torch.ones(3, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(**{**inputs, "input_ids": full_ids, "attention_mask": full_mask}, use_cache=False)
        prompt = model(**inputs, use_cache=True)
        cache = getattr(prompt, CACHE_NAME)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1]
        continued = model(
            input_ids=full_ids[:, -2:],
            attention_mask=full_mask,
            position_ids=emma_position_ids(full_ids, full_mask, model.config)[:, -2:],
            **{argument: cache},
        )
    assert getattr(continued, CACHE_NAME) is cache and cache.get_seq_length() == full_ids.shape[1]
    torch.testing.assert_close(continued.logits, full.logits[:, -2:], rtol=1e-5, atol=1e-5)


def test_cache_passed_twice_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="pass the KV cache once"):
        model(input_ids=torch.tensor([[1, 2]]), cache=object(), past_key_values=object())


def test_no_cache_is_kept_where_the_trainer_or_training_turn_it_off():
    model = tiny_model()
    input_ids = torch.tensor([[1, 2, 3]])
    assert getattr(model(input_ids=input_ids), CACHE_NAME) is not None
    model.config.use_cache = False  # what the Trainer does with `TrainingArguments.use_cache=False`
    assert getattr(model(input_ids=input_ids), CACHE_NAME) is None
    assert getattr(model(input_ids=input_ids, use_cache=True), CACHE_NAME) is not None

    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        assert getattr(output, CACHE_NAME) is None
        with torch.no_grad():  # a training-mode pass without gradients (e.g. sampling while training) may cache
            assert getattr(model(input_ids=input_ids), CACHE_NAME) is not None


def test_generation_continues_from_a_returned_cache():
    """transformers' common contract: generating on from `generate()`'s own cache gives the one-go tokens."""
    model = tiny_model(seed=2)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    settings = {"do_sample": False}
    whole = model.generate(input_ids, max_new_tokens=6, **settings)
    first = model.generate(input_ids, max_new_tokens=3, return_dict_in_generate=True, **settings)
    rest = model.generate(first.sequences, max_new_tokens=3, **{CACHE_NAME: getattr(first, CACHE_NAME)}, **settings)
    assert torch.equal(rest, whole)
