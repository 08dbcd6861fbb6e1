"""
EMMA-4B's components at their real size, made on this machine (no weights can be downloaded): Qwen3-4B,
SigLIP2-so400m-patch16-naflex and DC-AE f32c32 (Sana 1.1) with their published configs and random bf16 weights,
each saved by its own library in its Hub layout and sharding. Qwen3's tokenizer is the real one when Qwen's BPE
ranks can be found: the `dashscope` package ships them as `qwen.tiktoken` (the 151643 byte-level merges Qwen2 and
Qwen3 share), and transformers' `TikTokenConverter` (which needs `tiktoken`) turns them into merges.

    pip install dashscope tiktoken          # optional: the real Qwen3 vocabulary
    python -m benchmarks.real_size components /tmp/emma-4b-components
    emma-hf convert --llm /tmp/emma-4b-components/qwen3-4b ... --output /tmp/emma-4b
    python -m benchmarks.real_size run /tmp/emma-4b [--steps load chat t2i-512 ...]

`run` measures each step in a fresh process: its seconds, and its peak memory above the weights (every weight is
read once first, so the memory-mapped weights are resident before the step starts).
"""

import argparse
import importlib.abc
import importlib.util
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderDC
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM, Siglip2Config, Siglip2Model


# config.json of Qwen/Qwen3-4B as published.
QWEN3_4B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# Qwen/Qwen3-4B's shards: three files of at most 4 GB.
QWEN3_4B_SHARD_SIZE = "4GB"
# config.json of google/siglip2-so400m-patch16-naflex as published (a full text + vision model, one file).
SIGLIP2_SO400M_NAFLEX_CONFIG = {
    "architectures": ["Siglip2Model"],
    "initializer_factor": 1.0,
    "model_type": "siglip2",
    "text_config": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip2_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "vocab_size": 256000,
    },
    "vision_config": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip2_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_patches": 256,
        "patch_size": 16,
    },
}
# Qwen3's added tokens, ids 151643-151668, in order (tokenizer_config.json of Qwen/Qwen3-4B).
QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]  # fmt: skip
# The pre-tokenizer split of Qwen's tokenizers (one digit per token).
QWEN_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_NUM_BPE_TOKENS = 151643


def qwen_bpe_ranks() -> Path | None:
    """`qwen.tiktoken` from the installed `dashscope` package, or None."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or spec.origin is None:
        return None
    ranks = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    return ranks if ranks.is_file() else None


def qwen3_tokenizer(ranks: Path) -> Qwen2Tokenizer:
    """Qwen3's tokenizer from Qwen's BPE ranks and Qwen3's published special tokens (ids 151643-151668)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN_SPLIT_PATTERN
    ).extract_vocab_merges_from_model(str(ranks))
    if len(vocab) != QWEN_NUM_BPE_TOKENS:
        raise ValueError(f"{ranks} holds {len(vocab)} tokens; Qwen's BPE has {QWEN_NUM_BPE_TOKENS}")
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, model_max_length=131072
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN3_SPECIAL_TOKENS})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(QWEN3_SPECIAL_TOKENS)
    if ids != list(range(QWEN_NUM_BPE_TOKENS, QWEN_NUM_BPE_TOKENS + len(QWEN3_SPECIAL_TOKENS))):
        raise ValueError(f"Qwen3's special tokens landed on ids {ids[0]}..{ids[-1]}, not 151643..151668")
    return tokenizer


@torch.no_grad()
def fill_randomly(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Normal(0, 0.02) weights, unit norm scales, zero biases: random, but numerically like a trained model."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("bias", "running_mean"):
            tensor.zero_()
        elif tensor.ndim == 1:
            tensor.fill_(1.0)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32).mul_(0.02))


def empty_model(model_class, config):
    """The model in bf16 with uninitialised weights: built on the meta device, then given memory once."""
    with torch.device("meta"):
        model = model_class(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()
    return model


def write_components(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """The three component folders under `folder` (`qwen3-4b`, `siglip2-so400m-patch16-naflex`, `dc-ae-f32c32`)."""
    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    paths = {
        "llm": folder / "qwen3-4b",
        "vision": folder / "siglip2-so400m-patch16-naflex",
        "vae": folder / "dc-ae-f32c32-sana-1.1",
    }
    llm = empty_model(Qwen3ForCausalLM, Qwen3Config.from_dict(QWEN3_4B_CONFIG))
    fill_randomly(llm, generator)
    llm.save_pretrained(paths["llm"], max_shard_size=QWEN3_4B_SHARD_SIZE)
    del llm
    ranks = qwen_bpe_ranks()
    if ranks is not None:
        qwen3_tokenizer(ranks).save_pretrained(paths["llm"])
    vision = empty_model(Siglip2Model, Siglip2Config.from_dict(SIGLIP2_SO400M_NAFLEX_CONFIG))
    fill_randomly(vision, generator)
    vision.save_pretrained(paths["vision"])
    del vision
    from emma_hf.configuration_emma import DC_AE_F32C32_CONFIG

    vae = AutoencoderDC(**DC_AE_F32C32_CONFIG).to(torch.bfloat16)
    fill_randomly(vae, generator)
    vae.save_pretrained(paths["vae"])
    return paths


def load_pipeline(folder: str, quantization: str, **loading):
    from emma_hf import EmmaPipeline
    from emma_hf.testing_utils import quantization_config

    settings = {} if quantization == "bf16" else {"quantization_config": quantization_config(quantization)}
    return EmmaPipeline.from_pretrained(folder, dtype=torch.bfloat16, **settings, **loading)


class HideEmmaHf(importlib.abc.MetaPathFinder):
    """Makes `emma_hf` unimportable, as on a machine that has only the checkpoint's remote code."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "emma_hf":
            raise ModuleNotFoundError(f"{name} is hidden to measure loading with remote code")


def random_image(side: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def chat(pipe) -> None:
    processor, model = pipe.processor, pipe.model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[random_image(512)], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=4, do_sample=False)


def denoising_step(pipe, side: int, edit: bool) -> None:
    """One step at the checkpoint's guidance (text-to-image: 2 branches; edit: 3), latents out."""
    image = {"image": random_image(side)} if edit else {}
    pipe("a red apple on a table", height=side, width=side, num_inference_steps=1, output_type="latent", **image)


def lora_step(pipe, rows: int, quantization: str) -> None:
    """
    One optimiser step of a `generation`-preset LoRA (r=16) with gradient checkpointing on `rows` 512x512 edits; a
    quantised model is prepared the QLoRA way (PEFT's `prepare_model_for_kbit_training`).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from emma_hf.testing_utils import edit_batch
    from emma_hf.training.lora import emma_lora_config

    model = pipe.model
    if quantization == "bf16":
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, emma_lora_config(model, "generation"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(**edit_batch(model.config, 512, rows)).loss.backward()
    optimizer.step()


def decode(pipe, side: int) -> None:
    vae = pipe.model.model.vae
    latents = torch.randn(1, vae.config.latent_channels, side // 32, side // 32, dtype=vae.dtype)
    vae.decode(latents)


# `load` with emma_hf installed; `load-remote-code` with only the checkpoint's code (emma_hf hidden);
# `chat-offloaded`: accelerate's `device_map="auto"` with a CPU budget of OFFLOAD_CPU_BUDGET, the rest on disk, then
# `chat`.
LOADS = ("load", "load-remote-code", "chat-offloaded")
OFFLOAD_CPU_BUDGET = "3GiB"
STEPS = {
    "chat": chat,
    "t2i-512": lambda pipe: denoising_step(pipe, 512, edit=False),
    "t2i-1024": lambda pipe: denoising_step(pipe, 1024, edit=False),
    "edit-512": lambda pipe: denoising_step(pipe, 512, edit=True),
    "edit-1024": lambda pipe: denoising_step(pipe, 1024, edit=True),
    "decode-1024": lambda pipe: decode(pipe, 1024),
}
TRAINING_STEPS = {
    "lora-step-512x1": lambda pipe, quantization: lora_step(pipe, 1, quantization),
    "lora-step-512x4": lambda pipe, quantization: lora_step(pipe, 4, quantization),
}
# `bf16`, or one of emma_hf.testing_utils.QUANTIZATIONS (every setting at the library's default, no skip list).
QUANTIZATIONS = ("bf16", "bnb-8bit", "bnb-4bit", "torchao-int8")


def measure_step(folder: str, step: str, quantization: str = "bf16") -> dict:
    """One step in this process: load (every weight read once), then the step; seconds and peak RSS above."""
    with torch.inference_mode(step not in TRAINING_STEPS):
        return measure_step_in_mode(folder, step, quantization)


def measure_step_in_mode(folder: str, step: str, quantization: str) -> dict:
    from .harness import reset_peak_rss, rss_status

    if step == "chat-offloaded":
        with tempfile.TemporaryDirectory(dir=folder, prefix=".offload-") as offload_folder:
            start = reset_peak_rss()
            began = time.perf_counter()
            pipe = load_pipeline(
                folder,
                quantization,
                device_map="auto",
                max_memory={"cpu": OFFLOAD_CPU_BUDGET},
                offload_folder=offload_folder,
            )
            placed = Counter(pipe.model.hf_device_map.values())
            loaded = {"load_seconds": time.perf_counter() - began, "load_peak_rss": rss_status()["VmHWM"] - start}
            chat(pipe)
            offloaded_bytes = sum(f.stat().st_size for f in Path(offload_folder).rglob("*") if f.is_file())
        return {
            **loaded,
            "seconds": time.perf_counter() - began - loaded["load_seconds"],
            "peak_rss": rss_status()["VmHWM"] - start,
            "modules_on": dict(placed),
            "offload_folder_bytes": offloaded_bytes,
        }
    if step == "load-remote-code":
        from transformers import AutoModelForImageTextToText

        sys.meta_path.insert(0, HideEmmaHf())
        start = reset_peak_rss()
        began = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, trust_remote_code=True)
    else:
        start = reset_peak_rss()
        began = time.perf_counter()
        pipe = load_pipeline(folder, quantization)
        model = pipe.model
    loaded = {"load_seconds": time.perf_counter() - began}
    if quantization == "bf16":
        # The weights are memory-mapped: read each once, so that they count as resident before the step.
        weights = {tensor.data_ptr(): tensor for tensor in model.state_dict().values()}.values()
        for tensor in weights:
            tensor.sum()
        loaded["weight_bytes"] = sum(tensor.nbytes for tensor in weights)
    # Quantised weights are made in memory while loading, but the bf16 pages they were made from stay mapped (and
    # count in RSS) while the modules kept in bf16 still point into the same files: `loaded_rss_anon` is what the
    # process allocated, `loaded_rss_file` the mapped checkpoint pages, which the kernel can drop and read again.
    status = rss_status()
    loaded.update(
        load_peak_rss=status["VmHWM"] - start,
        loaded_rss=status["VmRSS"] - start,
        loaded_rss_anon=status["RssAnon"],
        loaded_rss_file=status["RssFile"],
    )
    if step in ("load", "load-remote-code"):
        return loaded
    baseline = reset_peak_rss()
    began = time.perf_counter()
    if step in TRAINING_STEPS:
        TRAINING_STEPS[step](pipe, quantization)
    else:
        STEPS[step](pipe)
    return {**loaded, "seconds": time.perf_counter() - began, "peak_above_weights": rss_status()["VmHWM"] - baseline}


def run_steps(folder: str, steps: list[str], quantization: str = "bf16") -> list[dict]:
    from .harness import run_child

    rows = []
    for step in steps:
        measured = run_child("step", folder, step, "--quantization", quantization, module="benchmarks.real_size")
        rows.append({"step": step, "quantization": quantization, **measured})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_size", description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    components = steps.add_parser("components", help="write the three component checkpoints (about 11 GB)")
    components.add_argument("folder")
    run = steps.add_parser("run", help="measure loading and each step at real size, each in a fresh process")
    run.add_argument("folder", help="an exported emma-4b checkpoint")
    run.add_argument("--steps", nargs="+", choices=[*LOADS, *STEPS, *TRAINING_STEPS], default=[*LOADS, *STEPS])
    run.add_argument("--quantization", choices=QUANTIZATIONS, default="bf16")
    step = steps.add_parser("step", help="one measurement in this process (used by run); prints JSON")
    step.add_argument("folder")
    step.add_argument("name", choices=[*LOADS, *STEPS, *TRAINING_STEPS])
    step.add_argument("--quantization", choices=QUANTIZATIONS, default="bf16")
    args = parser.parse_args(argv)
    if args.step == "components":
        for name, path in write_components(args.folder).items():
            size = sum(file.stat().st_size for file in path.iterdir()) / 2**30
            print(f"{name}: {path} ({size:.2f} GiB)")
    elif args.step == "run":
        run_steps(args.folder, args.steps, args.quantization)
    else:
        print(json.dumps(measure_step(args.folder, args.name, args.quantization)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
