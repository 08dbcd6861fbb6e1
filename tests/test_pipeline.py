"""EmmaPipeline: determinism, cached and batched-CFG exactness, outputs and callbacks, loading, sharing, input checks."""

import hashlib
import inspect
import json
import math
import os
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from builders import noise_image, run_python_without_emma_hf, tiny_chat_model
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

import emma_hf.pipeline_emma as pipeline_module
from emma_hf.hub import export_checkpoint
from emma_hf.pipeline_emma import EmmaPipeline


def make_pipeline(seed: int = 0) -> EmmaPipeline:
    model, processor = tiny_chat_model(seed=seed)
    pipe = EmmaPipeline.from_model(model, processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline(seed=11)


def draw(pipe, seed: int = 0, **kwargs):
    settings = {"num_inference_steps": 3, "output_type": "pt", "generator": torch.Generator().manual_seed(seed)}
    return pipe(**{"prompt": "Draw a blue triangle on the left.", **settings, **kwargs}).images


SOURCE = noise_image(64, 96, 4)


def test_same_seed_same_image_and_latents_remove_randomness(pipe, monkeypatch):
    first, again, other = draw(pipe, seed=1), draw(pipe, seed=1), draw(pipe, seed=2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    edit, edit_again = (draw(pipe, seed=3, image=SOURCE, prompt="Make the circle green.") for _ in range(2))
    assert torch.equal(edit, edit_again) and edit.shape == (1, 3, 64, 96)

    latents = torch.randn(1, 32, 3, 3, generator=torch.Generator().manual_seed(5))

    def no_randomness(*args, **kwargs):
        raise AssertionError("randn_tensor was called although latents were given")

    monkeypatch.setattr(pipeline_module, "randn_tensor", no_randomness)
    with_latents = [draw(pipe, seed=seed, latents=latents, generator=None) for seed in (0, 1)]
    assert torch.equal(*with_latents)


def full_sequence_velocity(pipe, text: str, image, latents: torch.Tensor, t: float) -> torch.Tensor:
    """The velocity of the same gen tokens from one forward over context + gen placeholders, without any cache."""
    model, processor = pipe.model, pipe.processor
    inputs = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    gen = torch.full((1, latents.shape[-2] * latents.shape[-1]), model.config.gen_token_id)
    input_ids = torch.cat([inputs["input_ids"], gen], dim=1)
    output = model(
        input_ids=input_ids,
        pixel_values=inputs.get("pixel_values"),
        vae_pixel_values=inputs.get("vae_pixel_values"),
        image_grid_hw=inputs.get("image_grid_hw"),
        noisy_latents=latents,
        timesteps=torch.tensor([t]),
        use_cache=False,
    )
    return output.velocity.reshape(1, latents.shape[-2], latents.shape[-1], -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("edit", [False, True])
@pytest.mark.parametrize("guidance", [False, True])
def test_cached_context_velocity_equals_full_forward(pipe, edit, guidance):
    prompts = ["Make the circle green.", "Draw two red squares."]
    images = [SOURCE, noise_image(64, 96, 6)] if edit else None
    negatives = ["blurry", ""]
    context, num_conditions = pipe.encode_prompt(prompts, images, negatives, guidance, guidance and edit)
    assert num_conditions == 1 + guidance + (guidance and edit)
    latents = torch.randn(len(prompts), 32, 2, 3, generator=torch.Generator().manual_seed(0))
    t = 0.63
    cached = pipe.model.predict_velocity(latents.repeat(num_conditions, 1, 1, 1), t, context)
    condition_texts = [(p, True) for p in prompts] + ([(n, True) for n in negatives] if guidance else [])
    condition_texts += [(p, False) for p in prompts] if guidance and edit else []
    for row, (text, with_image) in enumerate(condition_texts):
        image = images[row % len(prompts)] if edit and with_image else None
        prompt_text = pipe.processor.generation_prompt(text, image is not None)
        expected = full_sequence_velocity(pipe, prompt_text, image, latents[row % len(prompts)][None], t)
        torch.testing.assert_close(cached[row][None], expected, atol=1e-5, rtol=0)


def test_batched_guidance_equals_the_formula_on_separate_forwards(pipe):
    pipe._guidance_scale, pipe._image_guidance_scale, pipe._guidance_renorm_min = 3.0, 1.7, None
    pipe._do_text_guidance = pipe._do_image_guidance = True
    prompt, negative = "Make the circle green.", "blurry"
    context, num_conditions = pipe.encode_prompt([prompt], [SOURCE], [negative], True, True)
    latents = torch.randn(1, 32, 2, 3, generator=torch.Generator().manual_seed(1))
    guided = pipe.predict_guided_velocity(latents, torch.tensor(0.4), context, num_conditions, guided=True)

    def alone(text, image):
        single, _ = pipe.encode_prompt([text], [image] if image is not None else None, [""], False, False)
        return pipe.model.predict_velocity(latents, 0.4, single).float()

    full, no_text, no_image = alone(prompt, SOURCE), alone(negative, SOURCE), alone(prompt, None)
    text_guided = no_text + 3.0 * (full - no_text)
    expected = no_image + 1.7 * (text_guided - no_image)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=0)

    pipe._guidance_renorm_min = 0.0
    renormed = pipe.predict_guided_velocity(latents, torch.tensor(0.4), context, num_conditions, guided=True)
    torch.testing.assert_close(renormed.norm(), torch.minimum(full.norm(), expected.norm()), atol=1e-4, rtol=1e-5)


def test_guidance_interval_runs_only_the_full_condition_outside_it(pipe, monkeypatch):
    batches = []
    predict = pipe.model.predict_velocity

    def counting(latents, t, context):
        batches.append(latents.shape[0])
        return predict(latents, t, context)

    monkeypatch.setattr(pipe.model, "predict_velocity", counting)
    draw(pipe, num_inference_steps=4, image=SOURCE, guidance_interval=(0.0, 0.5), prompt="Make it red.")
    assert batches[0] == 1 and batches[-1] == 3 and set(batches) == {1, 3}


def test_output_types_agree(pipe):
    as_pt = draw(pipe, seed=4)
    as_np = draw(pipe, seed=4, output_type="np")
    as_pil = draw(pipe, seed=4, output_type="pil")
    latent = draw(pipe, seed=4, output_type="latent")
    assert isinstance(as_np, np.ndarray) and as_np.shape == (1, 96, 96, 3)
    torch.testing.assert_close(torch.from_numpy(as_np).permute(0, 3, 1, 2), as_pt)
    assert np.abs(np.asarray(as_pil[0], dtype=np.float32) / 255 - as_np[0]).max() <= 1 / 255 + 1e-6
    vae = pipe.model.vae
    decoded = ((vae.decode(latent / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decoded, as_pt)


def test_callback_reads_and_replaces_latents_and_interrupt_stops(pipe):
    seen = []

    def zero_at_last_step(pipeline, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    latent = draw(pipe, seed=5, output_type="latent", callback_on_step_end=zero_at_last_step)
    assert len(seen) == 3 and seen[0].shape == (1, 32, 3, 3) and torch.equal(latent, torch.zeros_like(latent))

    steps = []

    def stop_after_two(pipeline, step, timestep, tensors):
        steps.append(step)
        pipeline._interrupt = step == 1
        return {}

    stopped = draw(pipe, seed=5, output_type="latent", num_inference_steps=6, callback_on_step_end=stop_after_two)
    assert steps == [0, 1]
    manual = draw(pipe, seed=5, output_type="latent", num_inference_steps=6, callback_on_step_end=record_until(2))
    torch.testing.assert_close(stopped, manual)


def record_until(num_steps: int):
    """A callback that keeps the latents after `num_steps` steps and returns them as the final latents."""
    kept = {}

    def callback(pipeline, step, timestep, tensors):
        if step == num_steps - 1:
            kept["latents"] = tensors["latents"].clone()
        return {"latents": kept["latents"]} if "latents" in kept else {}

    return callback


REMOTE_PIPELINE = """
import json, sys
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
kwargs = json.loads(sys.argv[2])
kwargs["generator"] = torch.Generator().manual_seed(kwargs.pop("seed"))
images = pipe(**kwargs, output_type="pt").images
print(json.dumps({"class": type(pipe).__module__ + "." + type(pipe).__name__, "importable": emma_hf_importable(),
                  "sha": __import__("hashlib").sha256(images.numpy().tobytes()).hexdigest()}))
"""


def test_loads_with_diffusers_remote_code_where_emma_hf_is_missing(pipe, tmp_path):
    folder = export_checkpoint(pipe.model, pipe.processor, tmp_path / "emma-tiny", max_shard_size="300KB")
    image_path = tmp_path / "source.png"
    SOURCE.save(image_path)
    request = {"prompt": "Make the circle green.", "image": str(image_path), "num_inference_steps": 2, "seed": 9}
    expected = draw(pipe, **{**request, "seed": 9})
    result = run_python_without_emma_hf(REMOTE_PIPELINE, [str(folder), json.dumps(request)], tmp_path, tmp_path / "hf")
    assert result["importable"] is False and result["class"].endswith("pipeline_emma.EmmaPipeline")
    assert result["sha"] == hashlib.sha256(expected.numpy().tobytes()).hexdigest()


def test_installed_loading_and_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved", max_shard_size="300KB")
    reloaded = EmmaPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(draw(reloaded, seed=2), draw(pipe, seed=2))
    remote = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    assert torch.equal(draw(remote, seed=2), draw(pipe, seed=2))
    assert (
        type(AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")).__name__
        == "EmmaForConditionalGeneration"
    )
    weight_files = list((tmp_path / "saved").rglob("*.safetensors"))
    assert weight_files and all(path.parent == tmp_path / "saved" / "model" for path in weight_files)


def test_components_passed_to_from_pretrained_are_used_as_given(pipe, tmp_path):
    """diffusers' convention: `from_pretrained(folder, model=..., scheduler=...)` loads only the others."""
    pipe.save_pretrained(tmp_path / "saved")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    reloaded = EmmaPipeline.from_pretrained(tmp_path / "saved", model=pipe.model, scheduler=scheduler)
    assert reloaded.model is pipe.model and reloaded.scheduler is scheduler
    assert reloaded.processor is not pipe.processor
    assert reloaded.processor.tokenizer.get_vocab() == pipe.processor.tokenizer.get_vocab()


def test_from_pretrained_reads_a_plain_save_pretrained_folder(pipe, tmp_path):
    """A Trainer checkpoint (`model.save_pretrained` + processor, no `scheduler/`) draws as its export would."""
    pipe.model.save_pretrained(tmp_path / "checkpoint")
    pipe.processor.save_pretrained(tmp_path / "checkpoint")
    reloaded = EmmaPipeline.from_pretrained(tmp_path / "checkpoint")
    expected = FlowMatchEulerDiscreteScheduler(**pipe.model.config.flow_scheduler_config())
    assert dict(reloaded.scheduler.config) == dict(expected.config)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(draw(reloaded), draw(pipe))


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_pipeline_shares_the_chat_models_weights():
    model, processor = tiny_chat_model(
        seed=12, text_config={"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "vocab_size": 320}
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": SOURCE}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    before_chat = model.generate(**prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    rss_before = rss_bytes()
    pipe = EmmaPipeline.from_model(model, processor)
    assert rss_bytes() - rss_before < 0.01 * weight_bytes
    assert pipe.model is model and {name: p.data_ptr() for name, p in pipe.model.named_parameters()} == pointers
    pipe.set_progress_bar_config(disable=True)
    draw(pipe, image=SOURCE, prompt="Make the circle green.", num_inference_steps=2)
    after_chat = model.generate(**prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(before_chat, after_chat)


def test_lora_adapter_loads_into_the_pipeline(tmp_path):
    trained = make_pipeline(seed=13)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.gen\..*(q_proj|v_proj)")
    peft_model = get_peft_model(trained.model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapted = draw(trained, seed=3)

    fresh = make_pipeline(seed=13)
    plain = draw(fresh, seed=3)
    fresh.load_lora_weights(str(tmp_path / "adapter"))
    assert not torch.equal(plain, adapted)
    torch.testing.assert_close(draw(fresh, seed=3), adapted)


BAD_ARGUMENTS = [
    ({"prompt": None}, TypeError, "`prompt`"),
    ({"prompt": []}, TypeError, "`prompt`"),
    ({"prompt": ["a", 3]}, TypeError, "`prompt`"),
    ({"negative_prompt": ["a", "b"]}, ValueError, "`negative_prompt`"),
    ({"negative_prompt": 5}, TypeError, "`negative_prompt`"),
    ({"image": [SOURCE, SOURCE]}, ValueError, "`image`"),
    ({"height": 50}, ValueError, "`height`"),
    ({"width": -32}, ValueError, "`width`"),
    ({"height": 64.0}, ValueError, "`height`"),
    ({"num_inference_steps": 0}, ValueError, "`num_inference_steps`"),
    ({"num_inference_steps": 2.5}, ValueError, "`num_inference_steps`"),
    ({"timesteps": [900.0], "sigmas": [0.9]}, ValueError, "`timesteps` or `sigmas`"),
    ({"guidance_scale": -1.0}, ValueError, "`guidance_scale`"),
    ({"guidance_scale": float("nan")}, ValueError, "`guidance_scale`"),
    ({"image_guidance_scale": "2"}, ValueError, "`image_guidance_scale`"),
    ({"guidance_interval": (0.8, 0.2)}, ValueError, "`guidance_interval`"),
    ({"guidance_interval": (0.1,)}, ValueError, "`guidance_interval`"),
    ({"guidance_renorm_min": 1.5}, ValueError, "`guidance_renorm_min`"),
    ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt`"),
    ({"latents": torch.zeros(1, 32, 3)}, ValueError, "`latents`"),
    ({"latents": torch.full((1, 32, 3, 3), float("nan"))}, ValueError, "`latents`"),
    ({"latents": torch.zeros(2, 32, 3, 3)}, ValueError, "`latents`"),
    ({"generator": [torch.Generator(), torch.Generator()]}, ValueError, "`generator`"),
    ({"output_type": "jpeg"}, ValueError, "`output_type`"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "`callback_on_step_end_tensor_inputs`"),
]


@pytest.mark.parametrize("arguments, error, message", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(pipe, arguments, error, message, monkeypatch):
    monkeypatch.setattr(pipe.model, "encode_context", lambda *a, **k: pytest.fail("heavy work before the check"))
    call = {"prompt": "Draw a blue triangle.", "num_inference_steps": 2, **arguments}
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe(**call)


def test_sources_of_different_sizes_need_an_explicit_size(pipe):
    sources = [SOURCE, noise_image(96, 64, 1)]
    with pytest.raises(ValueError, match="pass `height` and `width`"):
        pipe(["a", "b"], image=sources, num_inference_steps=1)
    images = pipe(["a", "b"], image=sources, num_inference_steps=1, height=64, width=64, output_type="pt").images
    assert images.shape == (2, 3, 64, 64)


def test_save_pretrained_keeps_the_pipelines_own_scheduler(pipe, tmp_path):
    swapped = EmmaPipeline.from_model(
        pipe.model,
        pipe.processor,
        FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=2.5, use_dynamic_shifting=False),
    )
    swapped.save_pretrained(tmp_path / "saved")
    for loaded in (
        EmmaPipeline.from_pretrained(tmp_path / "saved"),
        DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True),
    ):
        assert loaded.scheduler.config.shift == 2.5 and not loaded.scheduler.config.use_dynamic_shifting


def test_sampler_settings_left_out_are_the_checkpoints(tmp_path):
    model, processor = tiny_chat_model(seed=3)
    pipe = EmmaPipeline.from_model(model, processor)
    pipe.set_progress_bar_config(disable=True)
    pipe("Draw a blue triangle.", output_type="latent", image=SOURCE)
    assert (pipe.num_timesteps, pipe.guidance_scale, pipe.image_guidance_scale) == (30, 4.0, 2.0)

    model.config.image_sampler_defaults = {"num_inference_steps": 3, "guidance_scale": 1.0}
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = EmmaPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    for candidate in (pipe, reloaded):
        candidate("Draw a blue triangle.", output_type="latent", image=SOURCE)
        assert (candidate.num_timesteps, candidate.guidance_scale, candidate.image_guidance_scale) == (3, 1.0, 2.0)
    pipe("Draw a blue triangle.", output_type="latent", num_inference_steps=2, guidance_scale=3.0)
    assert (pipe.num_timesteps, pipe.guidance_scale) == (2, 3.0)
    assert "`num_inference_steps=3`, `guidance_scale=1.0`" in (tmp_path / "saved" / "README.md").read_text()


def public_settings(scheduler) -> dict:
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def flow_scheduler(name: str, config):
    """A scheduler of class `name` set up for flow matching, the way a diffusers user swaps one in."""
    scheduler_class = getattr(diffusers, name)
    if "prediction_type" in inspect.signature(scheduler_class.__init__).parameters:
        return scheduler_class.from_config(config, prediction_type="flow_prediction", use_flow_sigmas=True)
    return scheduler_class.from_config(config)


@pytest.mark.parametrize("name", EmmaPipeline._compatibles)
def test_every_compatible_scheduler_draws_and_keeps_its_class_and_settings_on_save(name, tmp_path):
    pipe = make_pipeline(seed=11)
    pipe.scheduler = flow_scheduler(name, pipe.scheduler.config)
    drawn = draw(pipe)
    assert torch.isfinite(drawn).all() and torch.equal(draw(pipe), drawn)
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True, max_shard_size="1MB")
    assert len(list((tmp_path / "saved" / "model").glob("*.safetensors"))) > 1
    reloaded = EmmaPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler) is type(pipe.scheduler)
    assert public_settings(reloaded.scheduler) == public_settings(pipe.scheduler)
    assert torch.equal(draw(reloaded), drawn)


def test_a_swapped_schedulers_own_shift_settings_are_used():
    pipe = make_pipeline(seed=11)
    default = draw(pipe, height=128, width=128)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, base_shift=2.0, max_shift=3.0)
    shifted = draw(pipe, height=128, width=128)
    assert not torch.equal(shifted, default)
    assert pipe.dynamic_shift(16) == pytest.approx(math.exp(2.0 + (3.0 - 2.0) / (1024 - 64) * (16 - 64)))


def test_a_stochastic_scheduler_step_gets_the_generator():
    """With the starting noise fixed, only the scheduler's own noise, drawn from `generator`, tells seeds apart."""
    pipe = make_pipeline(seed=11)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    latents = draw(pipe, seed=0, output_type="latent")
    first, again, other = (draw(pipe, seed=seed, latents=latents) for seed in (4, 4, 5))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    ("scheduler_name", "settings", "message"),
    [
        ("EulerDiscreteScheduler", {}, "needs a flow-matching scheduler"),
        ("DPMSolverMultistepScheduler", {}, "must predict flow"),
    ],
)
def test_schedulers_that_cannot_run_emma_are_refused_by_name(scheduler_name, settings, message):
    pipe = make_pipeline(seed=11)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config, **settings)
    with pytest.raises(ValueError, match=message):
        draw(pipe)


def test_custom_sigmas_on_a_scheduler_without_them_are_refused():
    pipe = make_pipeline(seed=11)
    pipe.scheduler = flow_scheduler("FlowMatchHeunDiscreteScheduler", pipe.scheduler.config)
    with pytest.raises(ValueError, match="does not take custom `sigmas`"):
        draw(pipe, sigmas=[1.0, 0.5])


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"safe_serialization": False}, "safetensors only"),
        ({"variant": "fp16"}, "variant='fp16' is not supported"),
        ({"commit_message": "x"}, "push_to_hub=True"),
    ],
)
def test_save_pretrained_refuses_what_it_cannot_honour(pipe, tmp_path, keywords, message):
    with pytest.raises(ValueError, match=message):
        pipe.save_pretrained(tmp_path / "saved", **keywords)
    assert not (tmp_path / "saved").exists()


def test_save_pretrained_pushes_to_the_hub_as_diffusers_does(pipe, tmp_path, monkeypatch):
    import emma_hf.hub as hub

    uploads = []
    monkeypatch.setattr(
        hub, "upload_export", lambda folder, repo_id, **settings: uploads.append((folder, repo_id, settings))
    )
    pipe.save_pretrained(tmp_path / "emma-tiny", push_to_hub=True, private=True, commit_message="first")
    assert uploads == [(tmp_path / "emma-tiny", "emma-tiny", {"private": True, "commit_message": "first"})]
    assert "emma-tiny" in (tmp_path / "emma-tiny" / "README.md").read_text()


def test_from_pretrained_reads_a_dtype_dict_per_component_and_refuses_variants(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    for dtype in (
        {"model": torch.bfloat16},
        {"default": torch.bfloat16},
        {"model": torch.bfloat16, "default": torch.float32},
    ):
        assert EmmaPipeline.from_pretrained(tmp_path / "saved", dtype=dtype).model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="may name 'model' and 'default'"):
        EmmaPipeline.from_pretrained(tmp_path / "saved", dtype={"unet": torch.bfloat16})
    with pytest.raises(ValueError, match="variant='fp16' is not supported"):
        EmmaPipeline.from_pretrained(tmp_path / "saved", variant="fp16")


def test_source_images_are_read_as_diffusers_image_processor_reads_them(pipe):
    """PIL, (H, W, C) arrays, (C, H, W) tensors in [0, 1] or [-1, 1], and 4-D batches (one image per prompt)."""
    unit = torch.from_numpy(np.asarray(SOURCE, dtype=np.float32) / 255).permute(2, 0, 1)
    edit = "Make the circle green."
    reference = draw(pipe, seed=3, image=SOURCE, prompt=edit)
    for source in (unit, unit * 2 - 1, unit[None], (unit * 2 - 1)[None], unit.permute(1, 2, 0).numpy()[None]):
        assert torch.equal(draw(pipe, seed=3, image=source, prompt=edit), reference)
    pair = draw(pipe, seed=3, image=torch.stack([unit, unit.flip(-1)]), prompt=[edit, edit])
    listed = draw(pipe, seed=3, image=[SOURCE, SOURCE.transpose(PIL.Image.FLIP_LEFT_RIGHT)], prompt=[edit, edit])
    assert torch.equal(pair, listed)
    with pytest.raises(ValueError, match="one source image per prompt"):
        draw(pipe, image=torch.stack([unit, unit, unit]), prompt=[edit, edit])
    with pytest.raises(ValueError, match=r"float images must hold finite values in \[0, 1\]"):
        draw(pipe, image=unit * 3, prompt=edit)


def test_numpy_scalars_are_read_as_the_numbers_they_hold(pipe):
    settings = {"height": 64, "width": 96, "num_inference_steps": 2, "guidance_scale": 3.0}
    as_numpy = {
        "height": np.int64(64),
        "width": np.int32(96),
        "num_inference_steps": np.int64(2),
        "guidance_scale": np.float32(3.0),
    }
    assert torch.equal(draw(pipe, **as_numpy), draw(pipe, **settings))


def test_callbacks_see_the_current_timestep_and_whether_guidance_runs(pipe):
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((pipeline.current_timestep, timestep, pipeline.do_classifier_free_guidance))
        return tensors

    draw(pipe, guidance_scale=3.0, callback_on_step_end=record)
    draw(pipe, guidance_scale=1.0, callback_on_step_end=record)
    assert [current is timestep for current, timestep, _ in seen] == [True] * 6
    assert [guided for _, _, guided in seen] == [True] * 3 + [False] * 3
    assert pipe.current_timestep is None


def test_the_example_in_the_call_docstring_runs():
    """`EXAMPLE_DOC_STRING`, which diffusers' docs show, runs as written on the shipped model."""
    code = "\n".join(
        line.strip()[4:] for line in pipeline_module.EXAMPLE_DOC_STRING.splitlines() if line.strip().startswith(">>> ")
    )
    namespace = {}
    exec(
        code.replace("shipped_model_path())", "shipped_model_path()); pipe.set_progress_bar_config(disable=True)"),
        namespace,
    )
    assert namespace["image"].size == namespace["edited"].size == (96, 96)
    assert "EmmaPipeline.from_pretrained" in EmmaPipeline.__call__.__doc__


def saved_adapter(folder, seed: int, rank: int = 4) -> str:
    """A PEFT adapter of the generation stream with random (non-zero) weights, saved as `PeftModel` saves it."""
    base = make_pipeline(seed=13)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=r".*language_model\.layers\.\d+\.gen\..*(q_proj|v_proj)"
    )
    peft_model = get_peft_model(base.model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return saved_adapter(folder / "a", seed=1), saved_adapter(folder / "b", seed=2)


def denoised(pipe, **kwargs) -> torch.Tensor:
    """The final latents: a LoRA of the drawing stream moves them well above float noise on the tiny model."""
    return draw(pipe, seed=3, output_type="latent", **kwargs)


def test_lora_adapters_load_switch_weigh_and_disable_as_in_diffusers(adapters):
    first, second = adapters
    pipe = make_pipeline(seed=13)
    plain = denoised(pipe)
    pipe.load_lora_weights(first)
    with_first = denoised(pipe)
    pipe.load_lora_weights(second)
    assert pipe.get_list_adapters() == {"model": ["default_0", "default_1"]}
    assert pipe.get_active_adapters() == ["default_1"]
    with_second = denoised(pipe)
    assert (with_first - plain).abs().max() > 1e-3 and (with_second - with_first).abs().max() > 1e-3

    pipe.set_adapters(["default_0", "default_1"], adapter_weights=[1.0, 0.0])
    assert pipe.get_active_adapters() == ["default_0", "default_1"]
    torch.testing.assert_close(denoised(pipe), with_first, atol=1e-6, rtol=0)
    pipe.set_adapters("default_0", 0.0)
    torch.testing.assert_close(denoised(pipe), plain, atol=1e-6, rtol=0)
    pipe.set_adapters("default_0")
    pipe.disable_lora()
    assert torch.equal(denoised(pipe), plain)
    pipe.enable_lora()
    torch.testing.assert_close(denoised(pipe), with_first, atol=1e-6, rtol=0)

    pipe.delete_adapters("default_1")
    assert pipe.get_list_adapters() == {"model": ["default_0"]}
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and not pipe.lora_layers()
    assert torch.equal(denoised(pipe), plain)
    with pytest.raises(ValueError, match="adapter_names must name loaded adapters"):
        pipe.set_adapters("default_0")


def test_lora_fuses_with_a_scale_unfuses_and_scales_per_call(adapters):
    first, _ = adapters
    pipe = make_pipeline(seed=13)
    plain = denoised(pipe)
    pipe.load_lora_weights(first, adapter_name="shapes")
    layers = pipe.lora_layers()
    weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    pipe.set_adapters("shapes", 0.5)
    half = denoised(pipe)
    pipe.set_adapters("shapes", 1.0)
    full = denoised(pipe)
    assert (half - plain).abs().max() > 1e-3 and (full - half).abs().max() > 1e-3
    torch.testing.assert_close(denoised(pipe, attention_kwargs={"scale": 0.5}), half)
    assert torch.equal(denoised(pipe), full)  # the per-call scale is undone

    pipe.fuse_lora(lora_scale=0.5)
    for layer, weight in zip(layers, weights):
        assert layer.scaling["shapes"] == 0.5 * layer.lora_alpha["shapes"] / layer.r["shapes"]
        delta = layer.scaling["shapes"] * (layer.lora_B["shapes"].weight @ layer.lora_A["shapes"].weight)
        torch.testing.assert_close(layer.get_base_layer().weight, weight + delta, atol=1e-6, rtol=0)
    # Merged arithmetic rounds differently from the separate LoRA path.
    torch.testing.assert_close(denoised(pipe), half, atol=2e-5, rtol=0)
    pipe.unfuse_lora()
    for layer, weight in zip(layers, weights):
        torch.testing.assert_close(layer.get_base_layer().weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(denoised(pipe), full, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_kwargs may only hold 'scale'"):
        draw(pipe, attention_kwargs={"temperature": 2.0})


def test_lora_weights_load_by_weight_name_and_from_a_state_dict(adapters, tmp_path):
    from peft import LoraConfig as Config
    from safetensors.torch import load_file

    first, _ = adapters
    reference = make_pipeline(seed=13)
    reference.load_lora_weights(first)
    expected = draw(reference, seed=3)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((Path(first) / "adapter_config.json").read_text())
    (renamed / "my_lora.safetensors").write_bytes((Path(first) / "adapter_model.safetensors").read_bytes())
    weights = load_file(Path(first) / "adapter_model.safetensors")
    for source, options in (
        (str(renamed), {"weight_name": "my_lora.safetensors"}),
        (weights, {}),
        (weights, {"lora_config": Config.from_pretrained(first)}),
    ):
        pipe = make_pipeline(seed=13)
        pipe.load_lora_weights(source, adapter_name="shapes", **options)
        torch.testing.assert_close(draw(pipe, seed=3), expected)
        with pytest.raises(ValueError, match="an adapter named 'shapes' is loaded already"):
            pipe.load_lora_weights(source, adapter_name="shapes", **options)
    with pytest.raises(FileNotFoundError, match="no LoRA weights file 'missing.safetensors'"):
        make_pipeline(seed=13).load_lora_weights(str(renamed), weight_name="missing.safetensors")
