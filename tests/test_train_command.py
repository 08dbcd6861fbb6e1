"""`emma-hf train`: a short run writes checkpoints and an export, resuming continues exactly, and two processes
(torchrun, gloo on CPU) give the loss of one process over the same global batch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import run_python_without_emma_hf, tiny_chat_model, write_toy_dataset
from safetensors.torch import load_file

from emma_hf.cli import main
from emma_hf.hub import export_checkpoint
from emma_hf.training import TrainConfig, build_trainer, run_training


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model, processor = tiny_chat_model(seed=0)
    export_checkpoint(model, processor, root / "base")
    write_toy_dataset(root / "data")
    return root


def write_config(root, name: str, **changes) -> str:
    training = {"max_steps": 6, "per_device_train_batch_size": 3, "save_steps": 3, "logging_steps": 1, "seed": 0}
    training.update(changes.pop("training", {}))
    config = {
        "model": "base",
        "stage": "sft",
        "output_dir": name,
        "data": {task: f"data/{task}.jsonl" for task in ("understanding", "text_to_image", "edit")},
        "noise_seed": 0,
        "training": {"use_cpu": True, "disable_tqdm": True, **training},
        **changes,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def trained_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def logged_losses(folder) -> list[dict]:
    return logged_entries(json.loads((folder / "trainer_state.json").read_text())["log_history"])


def test_train_writes_checkpoints_and_an_export(workspace, capsys):
    assert main(["train", write_config(workspace, "full")]) == 0
    run = workspace / "full"
    assert f"wrote {run / 'final'}" in capsys.readouterr().out
    assert (run / "checkpoint-3").is_dir() and (run / "checkpoint-6").is_dir()
    assert (run / "final" / "model_index.json").exists() and (run / "final" / "model").is_dir()
    losses = logged_losses(run / "checkpoint-6")
    assert len(losses) == 6 and all({"ce_loss", "fm_loss"} <= set(entry) for entry in losses)
    base = trained_weights(workspace / "base" / "model")
    final = trained_weights(run / "checkpoint-6")
    vae_keys = [key for key in base if key.startswith("model.vae.")]
    assert all(torch.equal(base[key], final[key]) for key in vae_keys)
    assert not torch.equal(base["model.und_adapter.linear_1.weight"], final["model.und_adapter.linear_1.weight"])
    card = (run / "final" / "README.md").read_text()
    assert "stage `sft`, 6 steps of 3 samples per device" in card
    assert "condition dropout: text 0.1, source image 0.2" in card  # the sft stage's defaults


def test_condition_dropout_comes_from_the_stage_unless_the_recipe_sets_it(workspace):
    stage_default = build_trainer(TrainConfig.from_yaml(write_config(workspace, "defaults")))
    assert (stage_default.data_collator.text_dropout, stage_default.data_collator.image_dropout) == (0.1, 0.2)
    assert stage_default.data_collator.dropout_seed == 0  # the run's seed
    chosen = build_trainer(TrainConfig.from_yaml(write_config(workspace, "chosen", text_dropout=0, image_dropout=0.4)))
    assert (chosen.data_collator.text_dropout, chosen.data_collator.image_dropout) == (0, 0.4)
    with pytest.raises(ValueError, match=r"text_dropout must be a probability in \[0, 1\] or null, got 2"):
        TrainConfig.from_yaml(write_config(workspace, "bad", text_dropout=2))


def test_the_context_pixel_budget_comes_from_the_stage_unless_the_recipe_sets_it(workspace):
    assert (
        build_trainer(TrainConfig.from_yaml(write_config(workspace, "sft"))).data_collator.max_context_pixels is None
    )
    pretrain = build_trainer(TrainConfig.from_yaml(write_config(workspace, "pretrain", stage="pretrain")))
    assert pretrain.data_collator.max_context_pixels == 512 * 512
    chosen = build_trainer(TrainConfig.from_yaml(write_config(workspace, "chosen", max_context_pixels=32 * 32)))
    assert chosen.data_collator.context_size == {"min_pixels": 32 * 32, "max_pixels": 32 * 32}
    with pytest.raises(TypeError, match="max_context_pixels must be a positive integer or null, got 'big'"):
        TrainConfig.from_yaml(write_config(workspace, "bad", max_context_pixels="big"))


def test_resumed_run_continues_with_the_same_optimiser_state(workspace):
    reference = workspace / "full"
    if not (reference / "checkpoint-6").exists():
        main(["train", write_config(workspace, "full")])
    resumed = workspace / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-3", resumed / "checkpoint-3")
    main(["train", write_config(workspace, "resumed", resume=True)])
    assert not (resumed / "checkpoint-6" / "optimizer.pt").samefile(reference / "checkpoint-6" / "optimizer.pt")
    expected, actual = trained_weights(reference / "checkpoint-6"), trained_weights(resumed / "checkpoint-6")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    saved = torch.load(reference / "checkpoint-6" / "optimizer.pt", weights_only=True)["state"]
    again = torch.load(resumed / "checkpoint-6" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(saved[i]["exp_avg_sq"], again[i]["exp_avg_sq"]) for i in saved)
    assert [e["loss"] for e in logged_losses(resumed / "checkpoint-6")] == [
        e["loss"] for e in logged_losses(reference / "checkpoint-6")
    ]


def test_two_processes_match_one_over_the_same_global_batch(workspace):
    """
    Tolerance: per-step losses within 1e-4 relative. The samples (text-to-image, same token counts) weigh the same in
    a per-process mean as in a batch mean; with samples of different lengths, DDP averages the processes' means.
    """
    only_drawing = {"task_ratios": {"text_to_image": 1, "understanding": 0, "edit": 0}, "num_samples": 12}
    single = write_config(
        workspace,
        "single",
        training={"max_steps": 3, "per_device_train_batch_size": 2, "save_steps": 3},
        **only_drawing,
    )
    double = write_config(
        workspace,
        "double",
        training={"max_steps": 3, "per_device_train_batch_size": 1, "save_steps": 3},
        **only_drawing,
    )
    for config, processes in ((single, 1), (double, 2)):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(29500 + processes), "-m", "emma_hf.cli", "train", config]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    one = logged_losses(workspace / "single" / "checkpoint-3")
    two = logged_losses(workspace / "double" / "checkpoint-3")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_bad_configs_name_the_problem(workspace, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "stage": "sft", "output_dir": "o", "data": {}, "epochs": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
        TrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": "m", "stage": "warmup", "output_dir": "o", "data": {"edit": "e.jsonl"}}))
    with pytest.raises(ValueError, match="unknown stage 'warmup'"):
        TrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": "m", "stage": "sft", "output_dir": "o"}))
    with pytest.raises(ValueError, match=r"missing keys \['data'\]"):
        TrainConfig.from_yaml(path)


def test_a_few_hundred_steps_lower_both_losses(workspace):
    """Thresholds: over 300 steps (batch 6, lr 1e-3, toy data), CE ends below 20% and flow-matching MSE below 50% of
    their first logged values (measured: 5.5 -> 0.05 and 6.5 -> 1.5)."""
    from emma_hf.training import build_trainer

    training = {"max_steps": 300, "per_device_train_batch_size": 6, "save_strategy": "no", "logging_steps": 10}
    training.update({"learning_rate": 1e-3, "warmup_steps": 20})
    trainer = build_trainer(TrainConfig.from_yaml(write_config(workspace, "learn", training=training)))
    trainer.train()
    logs = logged_entries(trainer.state.log_history)
    first, last = logs[0], logs[-3:]
    assert sum(entry["ce_loss"] for entry in last) / 3 < 0.2 * first["ce_loss"]
    assert sum(entry["fm_loss"] for entry in last) / 3 < 0.5 * first["fm_loss"]


def logged_entries(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


def test_lora_recipe_saves_an_adapter_the_pipeline_loads(workspace):
    from emma_hf import EmmaPipeline

    training = {"max_steps": 3, "save_strategy": "no", "learning_rate": 1e-2, "activation_checkpointing": True}
    lora = {"preset": "generation", "r": 4, "lora_alpha": 8}
    main(
        [
            "train",
            write_config(
                workspace,
                "lora",
                training=training,
                lora=lora,
                task_ratios={"edit": 1, "understanding": 0, "text_to_image": 0},
            ),
        ]
    )
    adapter = workspace / "lora" / "final"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    pipe = EmmaPipeline.from_pretrained(workspace / "base")
    pipe.set_progress_bar_config(disable=True)
    prompt = {"prompt": "Draw a red square.", "num_inference_steps": 2, "output_type": "pt"}
    plain = pipe(**prompt, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(adapter))
    assert not torch.equal(pipe(**prompt, generator=torch.Generator().manual_seed(0)).images, plain)


def test_peft_on_a_model_loaded_as_remote_code(workspace, tmp_path):
    script = """
import json, sys
import torch
from peft import get_peft_model
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
sys.path.insert(0, sys.argv[2])
from lora import emma_lora_config  # the preset module alone: emma_hf itself is hidden
peft_model = get_peft_model(model, emma_lora_config(model, "all", r=4))
peft_model.activation_checkpointing_enable()
peft_model.enable_input_require_grads()
peft_model.train()
ids = torch.tensor([[5, 6, 7, 8]])
peft_model(input_ids=ids, labels=ids).loss.backward()
trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
with_grad = [name for name, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
print(json.dumps({"module": type(model).__module__, "importable": emma_hf_importable(),
                  "all_lora": all("lora_" in n for n in trainable), "with_grad": len(with_grad)}))
"""
    lora_module = Path(__file__).parents[1] / "src" / "emma_hf" / "training"
    result = run_python_without_emma_hf(script, [str(workspace / "base"), str(lora_module)], tmp_path, tmp_path / "hf")
    assert result["module"].startswith("transformers_modules.") and result["importable"] is False
    assert result["all_lora"] and result["with_grad"] > 0


def test_batches_are_pinned_only_for_an_accelerator(workspace, recwarn):
    """A recipe without `use_cpu` on a CPU-only machine loads its batches without torch's pin_memory warning."""
    config = TrainConfig.from_yaml(write_config(workspace, "pinning"))
    del config.training["use_cpu"]
    trainer = build_trainer(config)
    assert trainer.args.dataloader_pin_memory == torch.accelerator.is_available()
    next(iter(trainer.get_train_dataloader()))
    assert torch.accelerator.is_available() or not [w for w in recwarn if "pin_memory" in str(w.message)]


def test_a_lora_recipe_starts_from_the_same_adapter_every_time(workspace):
    """The LoRA matrices are drawn before the Trainer seeds anything: the recipe's seed draws them."""
    lora = {"preset": "all", "r": 4, "lora_alpha": 8}
    starts = []
    for seed in (0, 0, 1):
        config = TrainConfig.from_yaml(write_config(workspace, "seeded", lora=lora, training={"seed": seed}))
        model = build_trainer(config).model
        starts.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert starts[0].keys() == starts[2].keys() and starts[0]
    assert all(torch.equal(starts[0][n], starts[1][n]) for n in starts[0])
    assert not all(torch.equal(starts[0][n], starts[2][n]) for n in starts[0])


def test_a_closed_vocabulary_learns_the_words_of_its_training_data(workspace):
    model, processor = tiny_chat_model(seed=0)
    processor.known_words = ["zebra"]
    export_checkpoint(model, processor, workspace / "closed")
    config = write_config(workspace, "closed-run", model="closed", training={"max_steps": 1, "save_strategy": "no"})
    assert main(["train", config]) == 0
    known = json.loads((workspace / "closed-run" / "final" / "processor_config.json").read_text())["known_words"]
    assert {"zebra", "what", "colour", "square", "draw", "make", "red"} <= set(known)
    assert "the" in known and not [word for word in known if word != word.lower()]


def test_a_second_run_on_the_same_output_dir_is_refused_while_the_first_runs(workspace):
    """The lock names the other process; a lock left by a process that has ended is taken over and removed."""
    config_path = write_config(workspace, "locked", training={"max_steps": 1})
    lock = workspace / "locked" / ".emma-train.lock"
    lock.parent.mkdir(exist_ok=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{other.pid}\n")
        with pytest.raises(RuntimeError, match=rf"being written by another training run \(process {other.pid}\)"):
            run_training(TrainConfig.from_yaml(config_path))
        assert not (workspace / "locked" / "final").exists()
    finally:
        other.kill()
        other.wait()
    run_training(TrainConfig.from_yaml(config_path))  # the lock of the ended process is stale
    assert (workspace / "locked" / "final" / "README.md").is_file() and not lock.exists()
