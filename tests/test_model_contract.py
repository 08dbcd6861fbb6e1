"""What transformers' common model tests expect of every model: output switches, loss inputs, loading forms."""

import copy

import pytest
import torch
from builders import images_of, noise_image, tiny_chat_model

from emma_hf import EmmaForConditionalGeneration


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_chat_model(seed=0)
    return model.eval(), processor


def chat_inputs(processor) -> dict:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": noise_image(64, 64, 1)}, {"type": "text", "text": "hi"}],
        }
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_return_dict_false_and_the_config_switch_give_the_output_as_a_tuple(tiny):
    model, processor = tiny
    inputs = chat_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        model.config.return_dict = False
        try:
            from_config = model(**inputs)
            assert isinstance(model(**inputs, return_dict=True), type(expected))
        finally:
            model.config.return_dict = True
    for output in (as_tuple, from_config):
        assert isinstance(output, tuple) and torch.equal(output[0], expected.logits)


def test_output_hidden_states_follows_the_argument_then_the_config(tiny):
    model, processor = tiny
    inputs = chat_inputs(processor)
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        assert model(**inputs).hidden_states is None
        assert len(model(**inputs, output_hidden_states=True).hidden_states) == layers + 1
        model.config.output_hidden_states = True
        try:
            assert len(model(**inputs).hidden_states) == layers + 1
            assert model(**inputs, output_hidden_states=False).hidden_states is None
        finally:
            model.config.output_hidden_states = False


def test_shift_labels_give_the_loss_of_the_labels_they_shift(tiny):
    """The Trainer passes `shift_labels` under context parallelism; they must not be dropped."""
    model, processor = tiny
    inputs = chat_inputs(processor)
    labels = inputs["input_ids"].clone()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        from_labels = model(**inputs, labels=labels).loss
        from_shift_labels = model(**inputs, shift_labels=shifted).loss
        unshifted = model(**inputs, shift_labels=labels).loss
    assert torch.allclose(from_labels, from_shift_labels) and not torch.allclose(from_labels, unshifted)


def test_from_pretrained_builds_from_a_config_and_a_state_dict_in_memory(tiny):
    model, processor = tiny
    inputs = chat_inputs(processor)
    rebuilt = EmmaForConditionalGeneration.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(**inputs).logits, model(**inputs).logits)
    with pytest.raises(ValueError, match="config= and state_dict="):
        EmmaForConditionalGeneration.from_pretrained(None, config=model.config)


@pytest.mark.parametrize("implementation", ["flash_attention_2", {"text_config": "flash_attention_2"}])
def test_attention_implementations_that_cannot_run_the_mask_are_refused_by_name(tiny, implementation):
    model, _ = tiny
    if isinstance(implementation, str):
        with pytest.raises(ValueError, match=r"not supported by EMMA.*\['eager', 'sdpa', 'flex_attention'\]"):
            EmmaForConditionalGeneration._from_config(copy.deepcopy(model.config), attn_implementation=implementation)
    with pytest.raises(ValueError, match="not supported by EMMA"):
        model.set_attn_implementation(implementation)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_set_attn_implementation_switches_between_the_supported_ones(tiny):
    model, processor = tiny
    inputs = chat_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
        model.set_attn_implementation("eager")
        try:
            assert model.config.text_config._attn_implementation == "eager"
            assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)
        finally:
            model.set_attn_implementation("sdpa")
    assert model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_supported_attention_implementations_give_the_same_logits(tiny, implementation):
    model, processor = tiny
    inputs = chat_inputs(processor)
    config = copy.deepcopy(model.config)
    other = EmmaForConditionalGeneration._from_config(config, attn_implementation=implementation).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(other(**inputs).logits, model(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("return_dict", [True, False, None])
def test_get_image_features_follows_the_transformers_contract(tiny, return_dict):
    """A `BaseModelOutputWithPooling`: the vision tower's output, and the decoder's tokens of each image as pooler_output."""
    model, processor = tiny
    images = [noise_image(64, 64, 1), noise_image(96, 64, 2)]
    pixels = processor.image_processor(images, return_tensors="pt")
    if return_dict is not None:  # None: the config's default
        model.config.return_dict = return_dict
    try:
        with torch.no_grad():
            output = model.get_image_features(**pixels)
            unpacked = model.get_image_features(images_of(pixels, "pixel_values"), images_of(pixels))
    finally:
        model.config.return_dict = True
    if return_dict is False:
        last_hidden_state, tokens = output
    else:
        last_hidden_state, tokens = output.last_hidden_state, output.pooler_output
    vision = model.config.vision_config
    patches = [
        int(grid.prod()) * (model.config.image_grid_size // vision.patch_size) ** 2 for grid in pixels["image_grid_hw"]
    ]
    assert last_hidden_state.shape == (2, max(patches), vision.hidden_size)
    hidden = model.config.text_config.hidden_size
    assert [tuple(t.shape) for t in tokens] == [(int(grid.prod()), hidden) for grid in pixels["image_grid_hw"]]
    unpacked_tokens = unpacked[1] if return_dict is False else unpacked.pooler_output
    assert all(torch.equal(packed, image) for packed, image in zip(tokens, unpacked_tokens))


def test_inputs_embeds_with_images_give_what_input_ids_give(tiny):
    """As in transformers' vision-language models: placeholders are found where embeddings equal their token's row."""
    model, processor = tiny
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": noise_image(64, 96, 1)}, {"type": "text", "text": "a"}],
            }
        ],
        [{"role": "user", "content": [{"type": "text", "text": "a b"}]}],
    ]
    batch = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    rest = {name: value for name, value in batch.items() if name != "input_ids"}
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        from_ids = model(**batch).logits
        from_embeds = model(inputs_embeds=embeds, **rest).logits
    torch.testing.assert_close(from_embeds, from_ids)
    settings = {
        "max_new_tokens": 4,
        "do_sample": False,
        "eos_token_id": None,
        "num_beams": 2,
        "num_return_sequences": 2,
    }
    by_ids = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    by_embeds = model.generate(inputs_embeds=embeds, **rest, **settings)
    assert by_embeds.tolist() == by_ids.tolist()
    gen = torch.full((1, 6), model.config.gen_token_id)
    latents = torch.randn(1, model.config.vae_config["latent_channels"], 2, 3)
    ids = torch.cat([batch["input_ids"][1:], gen], dim=1)
    drawing = {"noisy_latents": latents, "timesteps": torch.tensor([0.5]), "use_cache": False}
    with torch.no_grad():
        velocity = model(input_ids=ids, **drawing).velocity
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), **drawing).velocity
    torch.testing.assert_close(from_embeds, velocity)


def test_empty_image_inputs_are_no_images(tiny):
    """Empty lists or packed tensors with no rows (the processor's text-only output) read as text alone."""
    model, processor = tiny
    text = processor(text=["a b"], return_tensors="pt")
    assert text["pixel_values"].shape == (0, 3 * 32 * 32) and text["image_grid_hw"].shape == (0, 2)
    with torch.no_grad():
        alone = model(input_ids=text["input_ids"]).logits
        for images in (
            {"pixel_values": [], "vae_pixel_values": []},
            {k: v for k, v in text.items() if k != "input_ids"},
        ):
            torch.testing.assert_close(model(input_ids=text["input_ids"], **images).logits, alone)
