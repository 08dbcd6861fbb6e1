"""The rows of the table, one function each (issue 7 lists the claims they check)."""

import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from emma_hf import EmmaConfig, EmmaForConditionalGeneration
from emma_hf.convert import qwen3_from_emma
from emma_hf.hub import export_checkpoint
from emma_hf.pipeline_emma import apply_guidance
from emma_hf.sizes import parameter_report
from emma_hf.testing_utils import image_span, random_image, random_latent

from .harness import Row, checked_row, interleaved_medians, run_child
from .setups import Sizes, benchmark_pipeline, benchmark_processor, long_prompt, random_emma


def random_ids(length: int, seed: int, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (1, length), generator=torch.Generator().manual_seed(seed))


def backbone_overhead(model, qwen, sizes: Sizes) -> Row:
    """EMMA over text + one generated image (both streams, its mask) vs Qwen3 over as many text tokens."""
    config = model.config
    side = math.isqrt(sizes.backbone_tokens // 2) * config.image_grid_size
    gen_span = torch.tensor([image_span(config.gen_token_id, config, side, side)])
    input_ids = torch.cat([random_ids(sizes.backbone_tokens - gen_span.shape[1], 0), gen_span], 1)
    noisy = random_latent(config, side, side, seed=1)[None]
    text_ids = random_ids(input_ids.shape[1], 2)
    with torch.no_grad():
        times = interleaved_medians(
            {
                "emma": lambda: model(input_ids=input_ids, noisy_latents=noisy, timesteps=torch.tensor([0.5])),
                "qwen3": lambda: qwen(input_ids=text_ids),
            },
            sizes.repeats,
        )
    ratio = times["emma"] / times["qwen3"]
    return checked_row(
        "1 backbone overhead",
        f"EMMA forward, {input_ids.shape[1]} tokens ({int((input_ids == config.gen_token_id).sum())} gen) ÷ Qwen3",
        ratio,
        "<= 1.10",
        times,
    )


def chat_decode(model, qwen, sizes: Sizes) -> Row:
    """Greedy new tokens per second, EMMA's `generate` vs Qwen3's, same weights and prompt."""
    prompt = random_ids(32, 3)
    settings = {"max_new_tokens": sizes.decode_tokens, "min_new_tokens": sizes.decode_tokens, "do_sample": False}
    with torch.no_grad():
        times = interleaved_medians(
            {"emma": lambda: model.generate(prompt, **settings), "qwen3": lambda: qwen.generate(prompt, **settings)},
            sizes.repeats,
        )
    ratio = times["qwen3"] / times["emma"]
    return checked_row(
        "2 chat decode",
        f"EMMA tokens/s ÷ Qwen3 tokens/s, {sizes.decode_tokens} new tokens after 32",
        ratio,
        ">= 0.90",
        times,
    )


def compiled_decode(model, sizes: Sizes) -> Row:
    """
    Greedy new tokens per second with a static cache and the decode step compiled (inductor, `fullgraph=True`) vs
    eager `generate` (dynamic cache), same model and prompt. On a GPU transformers compiles by itself; elsewhere
    `CompileConfig._compile_all_devices` asks it to.
    """
    prompt = random_ids(32, 3)
    settings = {"max_new_tokens": sizes.decode_tokens, "min_new_tokens": sizes.decode_tokens, "do_sample": False}
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    static = {"cache_implementation": "static", "compile_config": compile_config}
    with torch.no_grad():
        eager_tokens = model.generate(prompt, **settings)
        compiled_tokens = model.generate(prompt, **settings, **static)
        times = interleaved_medians(
            {
                "eager": lambda: model.generate(prompt, **settings),
                "compiled": lambda: model.generate(prompt, **settings, **static),
                "static eager": lambda: model.generate(prompt, **settings, cache_implementation="static"),
            },
            sizes.repeats,
        )
    ratio = times["eager"] / times["compiled"]
    return Row(
        "10 compiled decode",
        f"static cache + compiled step tokens/s ÷ eager tokens/s, {sizes.decode_tokens} new tokens after 32; static "
        f"cache alone {times['eager'] / times['static eager']:.2f}×, same tokens: "
        f"{'yes' if torch.equal(eager_tokens, compiled_tokens) else 'no'}",
        ratio,
        details=times,
    )


def generation_prompt_ids(pipe, prompt: str, source=None) -> dict:
    processor = pipe.processor
    text = processor.generation_prompt(prompt, with_image=source is not None)
    return processor(text=[text], images=None if source is None else [source], return_tensors="pt")


def denoising_step(pipe, sizes: Sizes) -> Row:
    """One text-to-image step: against the cached prompt, recomputing prompt + image, and the image alone."""
    model, config, side = pipe.model, pipe.model.config, sizes.image_side
    inputs = generation_prompt_ids(pipe, long_prompt(sizes.prompt_words))
    num_gen = config.num_image_tokens(side, side)
    full_ids = torch.cat([inputs["input_ids"], torch.full((1, num_gen), config.gen_token_id)], 1)
    noisy = random_latent(config, side, side, seed=4)[None]
    t = torch.tensor([0.5])
    with torch.no_grad():
        context = model.encode_context(inputs["input_ids"])
        bare = model.encode_context(inputs["input_ids"][:, -1:])
        times = interleaved_medians(
            {
                "cached": lambda: model.predict_velocity(noisy, t, context),
                "recomputed": lambda: model(input_ids=full_ids, noisy_latents=noisy, timesteps=t),
                "gen tokens alone": lambda: model.predict_velocity(noisy, t, bare),
            },
            sizes.repeats,
        )
    ratio = times["cached"] / times["gen tokens alone"]
    return checked_row(
        "3 denoising step",
        f"cached step ÷ gen tokens alone ({num_gen} gen, {inputs['input_ids'].shape[1]} prompt tokens); "
        f"recomputing is {times['recomputed'] / times['cached']:.2f}× the cached step",
        ratio,
        "<= 1.2",
        times,
    )


def guided_step(pipe, sizes: Sizes, edit: bool) -> Row:
    """All CFG conditions in one batched step (as the pipeline runs them) vs one step per condition."""
    model, config, side = pipe.model, pipe.model.config, sizes.image_side
    source = random_image(side, side, seed=5) if edit else None
    pil_source = None
    if source is not None:
        pil_source = pipe.vae_image_processor.postprocess(source[None], output_type="pil")[0]
    prompt = long_prompt(sizes.prompt_words)
    context, num_conditions = pipe.encode_prompt(
        [prompt], None if pil_source is None else [pil_source], [""], True, edit, 1
    )
    singles = [context.select([i]) for i in range(num_conditions)]
    noisy = random_latent(config, side, side, seed=6)[None]
    t = torch.tensor([0.5])

    def batched():
        full, no_text, *rest = model.predict_velocity(noisy.repeat(num_conditions, 1, 1, 1), t, context).split(1)
        return apply_guidance(full, no_text, rest[0] if rest else None, 4.0, 2.0, None)

    def one_by_one():
        full, no_text, *rest = [model.predict_velocity(noisy, t, single) for single in singles]
        return apply_guidance(full, no_text, rest[0] if rest else None, 4.0, 2.0, None)

    with torch.no_grad():
        times = interleaved_medians({"batched": batched, "one by one": one_by_one}, sizes.repeats)
    task = "edit, 3 conditions" if edit else "text-to-image, 2 conditions"
    return checked_row(
        f"4 CFG ({task})",
        f"one batched guided step ÷ {num_conditions} single steps, {config.num_image_tokens(side, side)} gen tokens",
        times["batched"] / times["one by one"],
        "<= 1.0",
        times,
    )


def token_economy() -> list[Row]:
    """Visual tokens per image, EMMA (32 px per token, fused context) vs BAGEL's published scheme."""
    rows = []
    for side in (512, 1024):
        emma_t2i = (side // 32) ** 2
        emma_edit = 2 * emma_t2i  # source (SigLIP2 ‖ DC-AE fused on channels) + generated
        vit_side = min(side, 980)  # BAGEL's SigLIP (14 px patches) sees at most 980 px
        bagel_t2i = (side // 16) ** 2  # FLUX VAE (8x) + 2x2 patches = 16 px per token
        bagel_edit = (vit_side // 14) ** 2 + 2 * bagel_t2i  # ViT input + VAE input + VAE output
        rows.append(
            Row(
                f"5 token economy {side}²",
                f"T2I {emma_t2i} vs {bagel_t2i} = (S/32)² ÷ (S/16)²; edit {emma_edit} vs {bagel_edit} = "
                f"2(S/32)² ÷ ((min(S,980)/14)² + 2(S/16)²)",
                emma_edit / bagel_edit,
                "≈ 0.2 (edit)",
                None,
                {"emma_t2i": emma_t2i, "bagel_t2i": bagel_t2i, "emma_edit": emma_edit, "bagel_edit": bagel_edit},
            )
        )
    return rows


def pipeline_overhead(pipe, sizes: Sizes) -> Row:
    """`EmmaPipeline.__call__` wall time vs the model calls inside it (context, steps, decoding)."""
    model = pipe.model
    inside = {"seconds": 0.0}

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            inside["seconds"] += time.perf_counter() - start
            return result

        return wrapper

    calls = {"encode_context": model, "predict_velocity": model, "decode": model.vae}
    originals = {name: getattr(owner, name) for name, owner in calls.items()}
    side = sizes.pipeline_side
    settings = {"height": side, "width": side, "num_inference_steps": sizes.pipeline_steps, "output_type": "np"}
    walls, insides = [], []
    try:
        for name, owner in calls.items():
            setattr(owner, name, timed(originals[name]))
        for repeat in range(sizes.repeats + 1):
            inside["seconds"] = 0.0
            start = time.perf_counter()
            pipe(long_prompt(sizes.prompt_words), generator=torch.Generator().manual_seed(repeat), **settings)
            if repeat:  # the first call warms up
                walls.append(time.perf_counter() - start)
                insides.append(inside["seconds"])
    finally:
        for name, owner in calls.items():
            delattr(owner, name)
    ratio = sorted(w / i for w, i in zip(walls, insides))[len(walls) // 2]
    return checked_row(
        "6 pipeline overhead",
        f"__call__ wall ÷ model calls inside, {side}², {sizes.pipeline_steps} steps with CFG",
        ratio,
        "<= 1.05",
        {"wall": walls, "model calls": insides},
    )


def loading(sizes: Sizes) -> Row:
    """Peak RSS and time of `from_pretrained` on an exported checkpoint vs `load_file` of its safetensors."""
    model = random_emma(sizes.loading_text_config, seed=7).to(torch.bfloat16)
    processor = benchmark_processor(64)
    num_parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        export_checkpoint(model, processor, folder)
        del model
        weight_bytes = sum(f.stat().st_size for f in Path(folder, "model").glob("*.safetensors"))
        results = {"from_pretrained": [], "load_file": []}
        for _ in range(max(1, sizes.repeats // 2)):
            for name in results:
                results[name].append(run_child(name, folder))
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    peak = max(run["peak_rss_delta"] for run in results["from_pretrained"])
    return checked_row(
        "7 loading",
        f"from_pretrained peak RSS ÷ weight bytes, {num_parameters / 1e9:.2f}B parameters ({weight_bytes / 2**30:.2f} "
        f"GiB bf16); time {best['from_pretrained']['seconds'] / best['load_file']['seconds']:.2f}× load_file, "
        f"load_file peak {best['load_file']['peak_rss_delta'] / weight_bytes:.2f}×",
        peak / weight_bytes,
        "<= 1.2",
        {"weight_bytes": weight_bytes, **results},
    )


def training(sizes: Sizes) -> Row:
    """Samples/s and peak memory of a mixed-task training step, with and without gradient checkpointing."""
    runs = {mode: run_child("train", sizes.name, mode) for mode in ("plain", "checkpointing")}
    for _ in range(max(1, sizes.repeats // 2) - 1):
        for mode in runs:
            again = run_child("train", sizes.name, mode)
            runs[mode]["samples_per_second"] = max(runs[mode]["samples_per_second"], again["samples_per_second"])
    speed = runs["checkpointing"]["samples_per_second"] / runs["plain"]["samples_per_second"]
    memory = runs["checkpointing"]["peak_rss_delta"] / runs["plain"]["peak_rss_delta"]
    return Row(
        "8 training step",
        f"with ÷ without gradient checkpointing: samples/s {speed:.2f}×, peak memory of the step {memory:.2f}× "
        f"({runs['plain']['samples_per_second']:.2f} samples/s plain)",
        speed,
        "",
        None,
        runs,
    )


# bf16 dense peak FLOP/s and memory bandwidth (bytes/s) from the vendors' data sheets, by name fragment.
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}
GPU_ROWS = ("9 GPU T2I 1024², 50 steps, CFG", "9 GPU edit 1024², 50 steps, CFG", "9 GPU chat decode")


def denoising_flops(model, num_gen: int, num_context: int, conditions: int, steps: int) -> float:
    """Matmul FLOPs of a denoising loop: weights touched by gen tokens, plus attention scores and values."""
    text = model.config.text_config
    weights = 2 * parameter_report(model).active_per_gen_token * num_gen
    attention = (
        4 * text.num_hidden_layers * num_gen * (num_gen + num_context) * text.num_attention_heads * text.head_dim
    )
    return steps * conditions * (weights + attention)


def synchronized(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def gpu_rows(sizes: Sizes) -> list[Row]:
    """
    EMMA-4B with random bf16 weights on the GPU: seconds per 1024² image and model-FLOPs utilisation, and chat
    decode at batch 1 and 16 against the memory-bandwidth limit. The smoke size runs the same code on the CPU with
    the tiny preset (no verdicts), so it cannot rot.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu and sizes.name != "smoke":
        return [Row(name, "not measured (no GPU on this machine)") for name in GPU_ROWS]
    device = torch.device("cuda" if on_gpu else "cpu")
    preset, side, steps, dtype = ("emma-4b", 1024, 50, torch.bfloat16) if on_gpu else ("tiny", 64, 2, torch.float32)
    peak_flops, bandwidth = next(
        (peaks for fragment, peaks in GPU_PEAKS.items() if on_gpu and fragment in torch.cuda.get_device_name()),
        (None, None),
    )
    torch.manual_seed(0)
    with device:
        model = EmmaForConditionalGeneration(EmmaConfig.from_preset(preset)).to(dtype).eval()
    pipe = benchmark_pipeline(model, side)
    sync = synchronized(device)
    prompt = long_prompt(sizes.prompt_words)
    source = pipe.vae_image_processor.postprocess(random_image(side, side, seed=8)[None], output_type="pil")[0]
    rows = []
    for name, image in zip(GPU_ROWS[:2], (None, source)):
        settings = {"height": side, "width": side, "num_inference_steps": steps, "output_type": "pt"}
        runs = []
        for _ in range(2):  # the first call warms up
            sync()
            start = time.perf_counter()
            pipe(prompt, image=image, guidance_scale=4.0, image_guidance_scale=2.0, **settings)
            sync()
            runs.append(time.perf_counter() - start)
        seconds = runs[-1]
        num_gen = model.config.num_image_tokens(side, side)
        prompt_tokens = generation_prompt_ids(pipe, prompt, image)["input_ids"].shape[1]
        flops = denoising_flops(model, num_gen, prompt_tokens, 3 if image is not None else 2, steps)
        mfu = flops / seconds / peak_flops if peak_flops else None
        measured = f"{seconds:.2f} s per image" + (f", MFU {mfu:.1%}" if mfu is not None else "")
        if not on_gpu:
            measured = "CPU smoke run of the GPU code path"
        holds = (seconds <= 3 and mfu >= 0.4) if on_gpu and image is None and mfu is not None else None
        rows.append(Row(name, measured, seconds if on_gpu else None, "<= 3 s, MFU >= 40%", holds, {"runs": runs}))
    weight_bytes = parameter_report(model).und_decoder * torch.finfo(dtype).bits // 8
    decode = {}
    for batch in (1, 16):
        prompt_ids = torch.randint(0, 256, (batch, 32), device=device)
        settings = {"max_new_tokens": sizes.decode_tokens, "min_new_tokens": sizes.decode_tokens, "do_sample": False}

        def generate(prompt_ids=prompt_ids, settings=settings):
            with torch.no_grad():
                model.generate(prompt_ids, **settings)
            sync()

        seconds = interleaved_medians({"generate": generate}, sizes.repeats)["generate"]
        decode[batch] = batch * sizes.decode_tokens / seconds
    limit = bandwidth / weight_bytes if bandwidth else None
    measured = ", ".join(f"batch {b}: {rate:.0f} tokens/s" for b, rate in decode.items())
    ratio = decode[1] / limit if limit else None
    if limit:
        measured += f"; bandwidth limit at batch 1: {limit:.0f} tokens/s"
    if not on_gpu:
        measured = "CPU smoke run of the GPU code path"
    rows.append(Row(GPU_ROWS[2], measured, ratio, "batch-1 tokens/s ÷ bandwidth limit", None, decode))
    return rows


def all_rows(sizes: Sizes, only: set[str] | None = None) -> list[Row]:
    """Every row (or those whose number is in `only`), sharing one random model of the chosen size."""

    def wanted(number: str) -> bool:
        return only is None or number in only

    rows: list[Row] = []
    model = random_emma(sizes.text_config)
    if wanted("1") or wanted("2"):
        qwen = qwen3_from_emma(model)
        if wanted("1"):
            rows.append(backbone_overhead(model, qwen, sizes))
        if wanted("2"):
            rows.append(chat_decode(model, qwen, sizes))
        del qwen
    # Measured while the model is at hand, listed last.
    compiled = [compiled_decode(model, sizes)] if wanted("10") else []
    pipe = benchmark_pipeline(model, sizes.image_side)
    if wanted("3"):
        rows.append(denoising_step(pipe, sizes))
    if wanted("4"):
        rows += [guided_step(pipe, sizes, edit=False), guided_step(pipe, sizes, edit=True)]
    if wanted("5"):
        rows += token_economy()
    if wanted("6"):
        rows.append(pipeline_overhead(pipe, sizes))
    del pipe, model
    if wanted("7"):
        rows.append(loading(sizes))
    if wanted("8"):
        rows.append(training(sizes))
    if wanted("9"):
        rows += gpu_rows(sizes)
    return rows + compiled
