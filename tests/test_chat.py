"""Chat with images through processor + generate(): batches of mixed prompts, streaming, generation settings."""

import pytest
import torch
from builders import images_of, noise_image, tiny_chat_model
from transformers import GenerationConfig, TextStreamer

from emma_hf.modeling_emma import images_per_row


def conversations():
    first, second = noise_image(70, 50, 0), noise_image(40, 90, 1)
    return [
        [{"role": "user", "content": "Describe the picture in one sentence, please."}],
        [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "What colour?"}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": first},
                    {"type": "image", "image": second},
                    {"type": "text", "text": "How many circles are there?"},
                ],
            }
        ],
    ]


def chat_inputs(processor, messages):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batch_of_mixed_prompts_matches_each_prompt_alone(num_beams):
    model, processor = tiny_chat_model(seed=1)
    batch = chat_inputs(processor, conversations())
    assert images_per_row(batch["input_ids"], model.config) == [0, 1, 2]
    settings = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "eos_token_id": None}
    together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
    for row, messages in enumerate(conversations()):
        alone = chat_inputs(processor, messages)
        expected = model.generate(**alone, **settings)[:, alone["input_ids"].shape[1] :]
        assert together[row].tolist() == expected[0].tolist()


def test_every_returned_sequence_keeps_its_own_images():
    model, processor = tiny_chat_model(seed=2)
    batch = chat_inputs(processor, conversations())
    model_kwargs = {key: value for key, value in batch.items() if key != "input_ids"}
    ids, expanded = model._expand_inputs_for_generation(expand_size=2, input_ids=batch["input_ids"], **model_kwargs)
    assert images_per_row(ids, model.config) == [0, 0, 1, 1, 2, 2]
    original = images_of(batch)
    order = [0, 0, 1, 2, 1, 2]
    assert all(torch.equal(a, original[i]) for a, i in zip(expanded["vae_pixel_values"], order))
    assert expanded["image_grid_hw"].tolist() == [batch["image_grid_hw"][i].tolist() for i in order]
    sampled = model.generate(**batch, max_new_tokens=3, do_sample=True, num_return_sequences=2, eos_token_id=None)
    assert sampled.shape == (6, batch["input_ids"].shape[1] + 3)


def test_streamer_prints_the_generated_text(capsys):
    model, processor = tiny_chat_model(seed=3)
    inputs = chat_inputs(processor, conversations()[1])
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, streamer=streamer)
    printed = capsys.readouterr().out
    decoded = processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1] :])[0]
    assert printed.strip() == decoded.strip() and len(decoded) > 0


def test_generation_config_controls_length_stopping_and_sampling():
    model, processor = tiny_chat_model(seed=4)
    inputs = chat_inputs(processor, conversations()[2])
    prompt_length = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=5, eos_token_id=None))
    assert greedy.shape[1] == prompt_length + 5

    first_token = int(greedy[0, prompt_length])
    stopped = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=5, eos_token_id=first_token))
    assert stopped[0, prompt_length:].tolist() == [first_token]
    assert model.generation_config.eos_token_id == [processor.end_of_turn_token_id]

    sampling = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=5.0, top_k=0, eos_token_id=None)
    torch.manual_seed(0)
    first = model.generate(**inputs, generation_config=sampling)
    torch.manual_seed(0)
    again = model.generate(**inputs, generation_config=sampling)
    draws = [model.generate(**inputs, generation_config=sampling)[0, prompt_length:].tolist() for _ in range(3)]
    assert torch.equal(first, again)
    assert any(draw != greedy[0, prompt_length:].tolist() for draw in draws)


@pytest.mark.parametrize("drafts", ["prompt_lookup", "assistant_model"])
def test_prompt_lookup_and_assisted_decoding_answer_as_greedy_decoding_does(drafts):
    model, processor = tiny_chat_model(seed=1)
    messages = conversations()[1]
    inputs = chat_inputs(processor, messages)
    settings = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    greedy = model.generate(**inputs, **settings)
    # Prompt lookup copies the prompt's image placeholders into its drafts; a draft model drafts from the images.
    extra = (
        {"prompt_lookup_num_tokens": 3} if drafts == "prompt_lookup" else {"assistant_model": tiny_chat_model(1)[0]}
    )
    assert model.generate(**inputs, **settings, **extra).tolist() == greedy.tolist()
