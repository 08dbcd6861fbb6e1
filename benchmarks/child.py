"""
Measurements that need a fresh process for their own peak memory, run by `harness.run_child`:

    python -m benchmarks.child from_pretrained FOLDER     load an exported checkpoint with AutoModel classes
    python -m benchmarks.child load_file FOLDER           load the same safetensors with safetensors.torch
    python -m benchmarks.child train SIZE plain|checkpointing

Prints one JSON line: seconds, and the peak RSS above the RSS just before the measured work. Loading ends by
reading every tensor once: safetensors maps files lazily, so untouched weights would cost neither time nor memory.
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from emma_hf.testing_utils import mixed_batch

from .harness import reset_peak_rss, rss_status
from .setups import SIZES, random_emma


TRAIN_STEPS = 3


def measure(work) -> dict:
    baseline = reset_peak_rss()
    start = time.perf_counter()
    extra = work() or {}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_delta": rss_status()["VmHWM"] - baseline, **extra}


def touch(tensors) -> None:
    """Read every byte (a reduction in place, no float copies that would raise the peak)."""
    for tensor in tensors:
        tensor.sum()


def train(size: str, mode: str) -> dict:
    """A few forward/backward passes on mixed batches (a question, a text-to-image sample and an edit each)."""
    sizes = SIZES[size]
    model = random_emma(sizes.text_config).train()
    if mode == "checkpointing":
        model.activation_checkpointing_enable()
    batches = [mixed_batch(model.config, sizes.train_side) for _ in range(sizes.train_batch)]
    samples = sum(batch["input_ids"].shape[0] for batch in batches)

    def steps():
        timings = []
        for _ in range(TRAIN_STEPS):
            start = time.perf_counter()
            for batch in batches:
                model(**batch).loss.backward()
            timings.append(time.perf_counter() - start)
        return {"samples_per_second": samples / min(timings[1:] or timings)}

    return measure(steps)


def main(argv: list[str]) -> dict:
    mode, argument = argv[0], argv[1]
    if mode == "from_pretrained":
        return measure(
            lambda: touch(
                AutoModelForImageTextToText.from_pretrained(argument, dtype=torch.bfloat16).state_dict().values()
            )
        )
    if mode == "load_file":
        shards = sorted(Path(argument, "model").glob("*.safetensors"))
        return measure(lambda: touch(t for shard in shards for t in load_file(shard).values()))
    if mode == "train":
        return train(argument, argv[2])
    raise ValueError(f"unknown mode {mode!r}; allowed: from_pretrained, load_file, train")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
