"""
One model or pipeline used from several threads: chat is correct concurrently; a pipeline runs its calls one after
another (its call state lives on it, as diffusers' callbacks expect), and pipelines sharing one model draw in parallel.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from builders import noise_image, tiny_chat_model

from emma_hf import EmmaPipeline


def draw(pipeline: EmmaPipeline, prompt: str, seed: int, steps: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipeline(
        prompt, height=64, width=64, num_inference_steps=steps, generator=generator, output_type="pt"
    ).images


def chat(model, processor, text: str, seed: int) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[noise_image(48, 64, seed)], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_chat_from_several_threads_matches_one_after_another():
    model, processor = tiny_chat_model(seed=1)
    requests = [(f"question {i}", i) for i in range(6)]
    expected = [chat(model, processor, *request) for request in requests]
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda request: chat(model, processor, *request), requests)) == expected


def test_one_pipeline_from_several_threads_gives_each_call_its_own_image():
    pipe = EmmaPipeline.from_model(*tiny_chat_model(seed=2))
    pipe.set_progress_bar_config(disable=True)
    requests = [("a red circle", 0, 3), ("a blue square", 1, 5), ("a green triangle", 2, 4), ("a dot", 3, 2)]
    expected = [draw(pipe, *request) for request in requests]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda request: draw(pipe, *request), requests * 2))
    for result, reference in zip(results, expected * 2):
        assert torch.equal(result, reference)


def test_pipelines_sharing_one_model_draw_in_parallel():
    model, processor = tiny_chat_model(seed=2)
    pipes = [EmmaPipeline.from_model(model, processor) for _ in range(3)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    expected = [draw(pipes[0], "a red circle", seed) for seed in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda seed: draw(pipes[seed], "a red circle", seed), range(3)))
    assert all(torch.equal(result, reference) for result, reference in zip(results, expected))


def test_calling_the_pipeline_from_its_own_callback_is_refused():
    pipe = EmmaPipeline.from_model(*tiny_chat_model(seed=2))
    pipe.set_progress_bar_config(disable=True)

    def call_again(pipeline, step, timestep, tensors):
        draw(pipeline, "again", 0)
        return tensors

    with pytest.raises(RuntimeError, match="called from inside its own call"):
        pipe("a red circle", height=64, width=64, num_inference_steps=2, callback_on_step_end=call_again)
    assert draw(pipe, "a red circle", 0).shape == (1, 3, 64, 64)  # the refused call left the pipeline usable
