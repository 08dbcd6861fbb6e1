"""
Nothing lost: a training run killed while it writes a checkpoint resumes from the previous one, and saving a model
over an earlier save never leaves old weight files next to the new ones (nor loses the old ones to a failed write).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import tiny_chat_model, tiny_model, write_toy_dataset
from transformers.trainer_utils import get_last_checkpoint

from emma_hf import EmmaForConditionalGeneration
from emma_hf.hub import export_checkpoint
from emma_hf.training import TrainConfig, run_training


# Runs the recipe given as argv[1]; at the second checkpoint it writes half an optimizer file, then dies by SIGKILL.
KILLED_DURING_SAVE = """
import os, signal, sys

from transformers import Trainer

from emma_hf.training import TrainConfig, run_training

save_optimizer = Trainer._save_optimizer_and_scheduler


def die_during_second_save(self, output_dir):
    if self.state.global_step == 2:
        with open(os.path.join(output_dir, "optimizer.pt"), "wb") as file:
            file.write(b"half an optimizer")
        os.kill(os.getpid(), signal.SIGKILL)
    save_optimizer(self, output_dir)


Trainer._save_optimizer_and_scheduler = die_during_second_save
run_training(TrainConfig.from_yaml(sys.argv[1]))
"""


def write_recipe(root: Path, **changes) -> Path:
    recipe = {
        "model": "base",
        "stage": "sft",
        "output_dir": "run",
        "data": {"text_to_image": "data/text_to_image.jsonl", "understanding": "data/understanding.jsonl"},
        "noise_seed": 0,
        "training": {
            "max_steps": 3,
            "save_steps": 1,
            "logging_steps": 1,
            "per_device_train_batch_size": 2,
            "use_cpu": True,
            "disable_tqdm": True,
            "report_to": "none",
        },
        **changes,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_save_killed_midway_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    export_checkpoint(*tiny_chat_model(), tmp_path / "base")
    write_toy_dataset(tmp_path / "data")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_DURING_SAVE)
    killed = subprocess.run(
        [sys.executable, str(script), str(write_recipe(tmp_path))], capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    run = tmp_path / "run"
    assert get_last_checkpoint(run) == str(run / "checkpoint-1")
    assert not (run / "checkpoint-2").exists()
    optimizer = torch.load(run / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert optimizer["state"], "the complete checkpoint holds the optimizer state"
    EmmaForConditionalGeneration.from_pretrained(run / "checkpoint-1")

    trainer = run_training(TrainConfig.from_yaml(write_recipe(tmp_path, resume=True)))
    assert trainer.state.global_step == 3
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert steps == [1, 2, 3], "step 1 comes from checkpoint-1, steps 2 and 3 were trained again"
    assert torch.load(run / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def weight_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("model*.safetensors*"))


def assert_loads_as(folder: Path, expected: EmmaForConditionalGeneration) -> None:
    loaded = EmmaForConditionalGeneration.from_pretrained(folder)
    expected_state = expected.state_dict()
    assert all(torch.equal(value, expected_state[key]) for key, value in loaded.state_dict().items())


SHARDED = "400KB"  # the tiny model in several shards


def test_save_pretrained_over_an_earlier_save_leaves_only_the_new_weight_files(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, max_shard_size=SHARDED)
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert weight_files(tmp_path) == sorted({*shards, "model.safetensors.index.json"})
    assert len(set(shards)) > 1
    assert_loads_as(tmp_path, second)

    first.save_pretrained(tmp_path)
    assert weight_files(tmp_path) == ["model.safetensors"]
    assert_loads_as(tmp_path, first)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".saving-")]


def test_a_failed_save_pretrained_leaves_the_earlier_save_whole(tmp_path, monkeypatch):
    import transformers.modeling_utils

    first, second = tiny_model(seed=1), tiny_model(seed=2)
    first.save_pretrained(tmp_path, max_shard_size=SHARDED)
    before = {name: (tmp_path / name).read_bytes() for name in weight_files(tmp_path)}
    write_shard = transformers.modeling_utils.safe_save_file
    written = []

    def fail_after_one_shard(tensors, filename, metadata=None):
        if written:
            Path(filename).write_bytes(b"half a shard")
            raise OSError("disk full")
        written.append(filename)
        write_shard(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail_after_one_shard)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path, max_shard_size=SHARDED)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in weight_files(tmp_path)} == before
    assert_loads_as(tmp_path, first)


def test_export_over_an_earlier_export_leaves_only_the_new_shards(tmp_path):
    (first, processor), (second, _) = tiny_chat_model(seed=1), tiny_chat_model(seed=2)
    export_checkpoint(first, processor, tmp_path, max_shard_size=SHARDED)
    export_checkpoint(second, processor, tmp_path)
    assert weight_files(tmp_path / "model") == ["model.safetensors"]
    root_index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(root_index.values()) == {"model/model.safetensors"}
    assert_loads_as(tmp_path, second)
    assert_loads_as(tmp_path / "model", second)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_export_refuses_a_folder_it_did_not_write_unless_told_to_overwrite(tmp_path):
    model, processor = tiny_chat_model(seed=1)
    folder = tmp_path / "project"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "notes.txt").write_text("mine")
    (folder / "README.md").write_text("my project")
    before = folder_bytes(folder)
    with pytest.raises(ValueError, match="holds no EMMA export; pass overwrite=True"):
        export_checkpoint(model, processor, folder)
    assert folder_bytes(folder) == before

    export_checkpoint(model, processor, folder, overwrite=True)
    assert (folder / "README.md").read_text() != "my project"  # a file the export writes is replaced, as asked
    assert (folder / "model" / "notes.txt").read_text() == "mine"
    assert_loads_as(folder, model)
    assert not [path.name for path in tmp_path.iterdir() if path.name != "project"]


def test_re_export_keeps_what_it_did_not_write_and_replaces_what_it_did(tmp_path):
    (first, processor), (second, _) = tiny_chat_model(seed=1), tiny_chat_model(seed=2)
    folder = export_checkpoint(first, processor, tmp_path / "export", max_shard_size=SHARDED)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "eval.txt").write_text("scores")
    (folder / "model" / "eval.txt").write_text("model scores")
    export_checkpoint(second, processor, folder)
    assert (folder / "model" / "eval.txt").read_text() == "model scores"
    assert (folder / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (folder / "eval.txt").read_text() == "scores"
    assert weight_files(folder / "model") == ["model.safetensors"]
    assert_loads_as(folder, second)

    export_checkpoint(first, processor, folder, remote_code=False)  # the other layout: no file of the first stays
    assert not [name for name in ("processor", "model_index.json", "modeling_emma.py") if (folder / name).exists()]
    assert [path.name for path in (folder / "model").iterdir()] == ["eval.txt"]
    assert weight_files(folder) == ["model.safetensors"]
    assert (folder / "eval.txt").read_text() == "scores"
    assert_loads_as(folder, first)


def test_export_never_writes_through_symlinks(tmp_path):
    model, processor = tiny_chat_model(seed=1)
    folder = export_checkpoint(model, processor, tmp_path / "export")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    for name in ("README.md", "model/config.json"):
        (folder / name).unlink()
        (folder / name).symlink_to(outside)
    export_checkpoint(model, processor, folder)
    assert outside.read_text() == "keep me"
    assert not (folder / "README.md").is_symlink() and not (folder / "model" / "config.json").is_symlink()
    assert_loads_as(folder, model)


def test_a_failed_re_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    import emma_hf.hub

    (first, processor), (second, _) = tiny_chat_model(seed=1), tiny_chat_model(seed=2)
    folder = export_checkpoint(first, processor, tmp_path / "export")
    before = folder_bytes(folder)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(emma_hf.hub, "write_pipeline_files", disk_full)  # after the weights are written
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(second, processor, folder)
    assert folder_bytes(folder) == before
    assert [path.name for path in tmp_path.iterdir()] == ["export"]
    assert_loads_as(folder, first)


def test_strict_false_loads_a_damaged_checkpoint_as_transformers_does(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = tiny_chat_model(seed=1)
    folder = export_checkpoint(model, processor, tmp_path / "export")
    weights = load_file(folder / "model" / "model.safetensors")
    del weights["velocity_head.linear_1.weight"]
    save_file(weights, folder / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing .*velocity_head.linear_1.weight"):
        EmmaForConditionalGeneration.from_pretrained(folder)
    loaded, info = EmmaForConditionalGeneration.from_pretrained(folder, strict=False, output_loading_info=True)
    assert set(info["missing_keys"]) == {"velocity_head.linear_1.weight"}
    assert torch.equal(loaded.velocity_head.linear_2.weight, model.velocity_head.linear_2.weight)


def test_a_full_disk_while_checkpointing_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    import collections
    import errno

    import transformers

    import emma_hf.training.trainer

    export_checkpoint(*tiny_chat_model(), tmp_path / "base")
    write_toy_dataset(tmp_path / "data")
    save_optimizer = transformers.Trainer._save_optimizer_and_scheduler
    usage = collections.namedtuple("usage", "total used free")

    def disk_fills_at_the_second_save(trainer, output_dir):
        if trainer.state.global_step == 2:
            monkeypatch.setattr(emma_hf.training.trainer.shutil, "disk_usage", lambda path: usage(10, 10, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1106")
        save_optimizer(trainer, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", disk_fills_at_the_second_save)
    with pytest.raises(OSError, match=r"is full \(0 MiB free\) while writing checkpoint-2") as caught:
        run_training(TrainConfig.from_yaml(write_recipe(tmp_path)))
    assert caught.value.errno == errno.ENOSPC and "resume: true" in str(caught.value)
    assert get_last_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-1")


def test_an_export_loads_one_config_whichever_loader_reads_it(tmp_path):
    model, processor = tiny_chat_model(seed=1)
    folder = export_checkpoint(model, processor, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    config["image_sampler_defaults"] = {"num_inference_steps": 3}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json and model/config.json differ in \['image_sampler_defaults'\]"):
        EmmaForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ValueError, match="differ in"):
        EmmaForConditionalGeneration.from_pretrained(folder, subfolder="model")  # as diffusers loads the component
    (folder / "model" / "config.json").write_text(json.dumps(config))
    assert (
        EmmaForConditionalGeneration.from_pretrained(folder).config.image_sampler_defaults["num_inference_steps"] == 3
    )


def test_saving_one_part_into_an_export_is_refused(tmp_path):
    model, processor = tiny_chat_model(seed=1)
    folder = export_checkpoint(model, processor, tmp_path / "export")
    before = folder_bytes(folder)
    with pytest.raises(ValueError, match="is an exported EMMA checkpoint .* Export again instead"):
        model.save_pretrained(folder)
    with pytest.raises(ValueError, match="saving the processor alone"):
        processor.save_pretrained(folder)
    assert folder_bytes(folder) == before


def test_a_link_where_the_export_writes_a_folder_is_refused_and_nothing_moves(tmp_path):
    model, processor = tiny_chat_model(seed=1)
    folder = export_checkpoint(model, processor, tmp_path / "export")
    elsewhere = tmp_path / "elsewhere"
    (folder / "processor").rename(elsewhere)
    (folder / "processor").symlink_to(elsewhere, target_is_directory=True)
    before = folder_bytes(folder)
    with pytest.raises(ValueError, match=r"export/processor'\] stand where the export writes"):
        export_checkpoint(model, processor, folder)
    assert folder_bytes(folder) == before and (folder / "processor").is_symlink()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere", "export"]
