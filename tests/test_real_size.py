"""
EMMA-4B at its real size on a CPU (slow: `python -m pytest -m slow tests/test_real_size.py`).

Needs about 35 GB of free disk (10.6 GB of component checkpoints, 12.5 GiB converted) and 24 GB of memory (the
largest step peaks at 18 GiB); 23 minutes in all on 2 cores on 2026-12-07, with the quantised, fine-tuning and
offload steps (bitsandbytes and torchao: `pip install -e ".[quantization]"`). The files go under pytest's temporary
folder and are deleted afterwards, unless `EMMA_REAL_SIZE_DIR` names a folder to keep them in between runs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow
REPOSITORY = Path(__file__).resolve().parents[1]


def run_python(*arguments: str) -> str:
    """A fresh interpreter, so each step's peak memory is its own."""
    result = subprocess.run(
        [sys.executable, *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=False, timeout=3600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def real_size(tmp_path_factory):
    kept = os.environ.get("EMMA_REAL_SIZE_DIR")
    folder = Path(kept) if kept else tmp_path_factory.mktemp("real-size")
    print(f"\nreal-size files in {folder}: about 35 GB of disk")
    components = folder / "components"
    if not (components / "dc-ae-f32c32-sana-1.1" / "config.json").is_file():
        run_python("-m", "benchmarks.real_size", "components", str(components))
    yield folder
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def converted(real_size):
    components, output = real_size / "components", real_size / "emma-4b"
    stdout = run_python(
        "-m",
        "emma_hf.cli",
        "convert",
        "--llm",
        str(components / "qwen3-4b"),
        "--vision",
        str(components / "siglip2-so400m-patch16-naflex"),
        "--vae",
        str(components / "dc-ae-f32c32-sana-1.1"),
        "--output",
        str(output),
    )
    return output, stdout


def test_convert_streams_within_115_percent_of_the_weights(converted):
    output, stdout = converted
    match = re.search(r"([\d.]+) GiB of weights \(bfloat16\); peak memory \(RSS\) ([\d.]+) GiB, ([\d.]+)x", stdout)
    assert match, stdout
    weights, peak, ratio = map(float, match.groups())
    print(f"convert: {weights} GiB of weights, peak RSS {peak} GiB ({ratio}x)")
    assert 12.0 < weights < 13.0 and ratio <= 1.15
    shards = sorted(path.name for path in (output / "model").glob("*.safetensors"))
    assert shards and (output / "model" / "model.safetensors.index.json").is_file()


def measured(folder: Path, step: str, quantization: str = "bf16") -> dict:
    stdout = run_python("-m", "benchmarks.real_size", "step", str(folder), step, "--quantization", quantization)
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("load", ["load", "load-remote-code"])
def test_loading_peaks_within_110_percent_of_the_weights(converted, load):
    """With emma_hf installed, and with only the checkpoint's remote code."""
    output, _ = converted
    load = measured(output, load)
    assert load["load_peak_rss"] <= 1.1 * load["weight_bytes"], load


@pytest.mark.parametrize("step", ["chat", "t2i-512", "edit-512"])
def test_a_step_runs_at_real_size(converted, step):
    output, _ = converted
    result = measured(output, step)
    print(f"{step}: {result['seconds']:.0f} s, {result['peak_above_weights'] / 2**30:.2f} GiB above the weights")
    assert result["peak_above_weights"] < 4 * 2**30, result


@pytest.mark.parametrize("quantization", ["bnb-8bit", "bnb-4bit", "torchao-int8"])
def test_quantised_loading_chats_without_a_skip_list(converted, quantization):
    pytest.importorskip("torchao" if quantization == "torchao-int8" else "bitsandbytes")
    output, _ = converted
    result = measured(output, "chat", quantization)
    print(f"{quantization} chat: {result['seconds']:.0f} s, {result['loaded_rss_anon'] / 2**30:.2f} GiB allocated")
    # The quantised decoder is allocated; the bf16 modules stay mapped from the checkpoint.
    assert result["loaded_rss_anon"] < (8 if quantization == "bnb-4bit" else 10) * 2**30, result


@pytest.mark.parametrize("quantization", ["bf16", "bnb-4bit"])
def test_a_lora_step_runs_at_real_size(converted, quantization):
    if quantization != "bf16":
        pytest.importorskip("bitsandbytes")
    output, _ = converted
    result = measured(output, "lora-step-512x1", quantization)
    print(f"{quantization} LoRA step: {result['seconds']:.0f} s, +{result['peak_above_weights'] / 2**30:.2f} GiB")
    assert result["peak_above_weights"] < 8 * 2**30, result


def test_chat_offloaded_to_disk_with_a_small_cpu_budget(converted):
    output, _ = converted
    result = measured(output, "chat-offloaded")
    assert result["modules_on"].get("disk", 0) > 0, result
    assert result["peak_rss"] < 0.4 * 12.48 * 2**30, result
