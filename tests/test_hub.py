"""Exported checkpoints: one copy of the weights, remote code without emma_hf, Hub cache layout, round trips, push."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from builders import noise_image, run_python_without_emma_hf, tiny_chat_model
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from emma_hf import EmmaConfig, EmmaForConditionalGeneration, EmmaModel, EmmaProcessor
from emma_hf.hub import export_checkpoint, push_to_hub


QUESTION = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "IMAGE"},
            {"type": "image", "image": "IMAGE"},
            {"type": "text", "text": "How many circles are there?"},
        ],
    }
]


def chat_tokens(model, processor, image_path: str) -> list[int]:
    messages = json.loads(json.dumps(QUESTION).replace("IMAGE", image_path))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint exported in 4+ shards, an image file, and the tokens the in-process model answers with."""
    root = tmp_path_factory.mktemp("hub")
    model, processor = tiny_chat_model(seed=7)
    folder = export_checkpoint(
        model, processor, root / "emma-tiny", max_shard_size="300KB", base_model="Qwen/Qwen3-4B"
    )
    image_path = root / "question.png"
    noise_image(70, 110, 3).save(image_path)
    return {"model": model, "processor": processor, "folder": folder, "image": str(image_path), "root": root}


def test_layout_holds_one_copy_of_the_weights_and_all_files(exported):
    folder = exported["folder"]
    root_files = {path.name for path in folder.iterdir() if path.is_file()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "configuration_emma.py",
        "modeling_emma.py",
        "processing_emma.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    } <= root_files
    weight_files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors"))
    assert weight_files and all(name.startswith("model/model-") for name in weight_files) and len(weight_files) >= 4
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(exported["model"].state_dict())
    assert (
        {
            f"model/{shard}"
            for shard in json.loads((folder / "model/model.safetensors.index.json").read_text())["weight_map"].values()
        }
        == set(weight_files)
        == set(index["weight_map"].values())
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_emma.EmmaConfig",
        "AutoModel": "modeling_emma.EmmaModel",
        "AutoModelForImageTextToText": "modeling_emma.EmmaForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_emma.EmmaForConditionalGeneration",
        "AutoModelForMultimodalLM": "modeling_emma.EmmaForConditionalGeneration",
        "AutoProcessor": "processing_emma.EmmaProcessor",
    }
    assert config["image_token_id"] == exported["processor"].image_token_id
    card = (folder / "README.md").read_text()
    for field in ("library_name: transformers", "pipeline_tag: any-to-any", "license: apache-2.0", "base_model:"):
        assert field in card
    assert "arXiv:2512.04810" in card and "{{" not in card


def test_model_card_holds_every_section_and_this_models_choices(exported):
    card = (exported["folder"] / "README.md").read_text()
    sections = [line for line in card.splitlines() if line.startswith("## ")]
    assert sections == [
        "## Intended use",
        "## Chat about images",
        "## Draw and edit images",
        "## Fine-tune with LoRA",
        "## Design choices of this implementation",
        "## Training",
        "## Limitations",
        "## Citation",
    ]
    config = exported["model"].config
    assert f"`num_shallow_layers` = {config.num_shallow_layers} of {config.text_config.num_hidden_layers}" in card
    assert f"`vision_moe_layers` = {config.vision_moe_layers}" in card
    assert 'AutoModelForImageTextToText.from_pretrained("emma-tiny"' in card
    assert 'DiffusionPipeline.from_pretrained("emma-tiny"' in card and "get_peft_model" in card


def test_model_card_texts_come_from_the_exporter(tmp_path):
    model, processor = tiny_chat_model()
    texts = {"intended_use": "Tests only.", "training": "Nothing at all.", "limitations": "It is random."}
    card = (export_checkpoint(model, processor, tmp_path / "card", **texts) / "README.md").read_text()
    assert all(f"\n{text}\n" in card for text in texts.values())


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    source, image_path = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    backbone = AutoModel.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    messages = json.loads(sys.argv[3].replace("IMAGE", image_path))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    print(json.dumps({
        "classes": [type(config).__name__, type(backbone).__name__, type(model).__name__, type(processor).__name__,
                    type(processor.image_processor).__name__],
        "modules": [type(model).__module__, type(processor).__module__],
        "tokens": output[0, inputs["input_ids"].shape[1]:].tolist(),
        "emma_hf_importable": emma_hf_importable(),
    }))
    """
)


def run_without_emma_hf(source: str, image_path: str, workdir: Path, hf_home: Path) -> dict:
    return run_python_without_emma_hf(REMOTE_SCRIPT, [source, image_path, json.dumps(QUESTION)], workdir, hf_home)


def place_in_hub_cache(folder: Path, hub_cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub leaves after a download: blobs, a snapshot per commit and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_loads_with_remote_code_where_emma_hf_is_missing(exported, tmp_path):
    expected = chat_tokens(exported["model"], exported["processor"], exported["image"])
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    hf_home = tmp_path / "hf_home"
    from_folder = run_without_emma_hf(str(exported["folder"]), exported["image"], workdir, hf_home)
    assert from_folder["emma_hf_importable"] is False
    assert from_folder["classes"] == [
        "EmmaConfig",
        "EmmaModel",
        "EmmaForConditionalGeneration",
        "EmmaProcessor",
        "EmmaImageProcessor",
    ]
    assert all(module.startswith("transformers_modules.") for module in from_folder["modules"])
    assert from_folder["tokens"] == expected

    place_in_hub_cache(exported["folder"], hf_home / "hub", "emma-org/emma-tiny")
    from_cache = run_without_emma_hf("emma-org/emma-tiny", exported["image"], workdir, hf_home)
    assert from_cache["classes"] == from_folder["classes"] and from_cache["tokens"] == expected


def test_installed_package_loads_without_trust_remote_code(exported):
    folder = exported["folder"]
    assert type(AutoConfig.from_pretrained(folder)) is EmmaConfig
    assert type(AutoModel.from_pretrained(folder)) is EmmaModel
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is EmmaForConditionalGeneration and type(processor) is EmmaProcessor
    expected = chat_tokens(exported["model"], exported["processor"], exported["image"])
    assert chat_tokens(model, processor, exported["image"]) == expected


def test_round_trip_is_bit_exact_and_keeps_bf16(exported, tmp_path):
    model, processor = exported["model"], exported["processor"]
    half = EmmaForConditionalGeneration(model.config).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    half.generation_config = GenerationConfig.from_dict(model.generation_config.to_dict())
    folder = export_checkpoint(half, processor, tmp_path / "bf16", max_shard_size="300KB")
    loaded = EmmaForConditionalGeneration.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16
    expected, actual = half.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(
        torch.equal(expected[key], actual[key]) and actual[key].dtype == expected[key].dtype for key in expected
    )
    assert EmmaConfig.from_pretrained(folder).to_dict() == half.config.to_dict()
    assert loaded.generation_config.to_diff_dict() == half.generation_config.to_diff_dict()
    assert loaded.generation_config.eos_token_id == [processor.end_of_turn_token_id]

    reloaded = AutoProcessor.from_pretrained(folder)
    reloaded.save_pretrained(tmp_path / "saved_again")
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "saved_again" / name).read_bytes() == (folder / name).read_bytes()
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    text = ["<|vision_start|><|image_pad|><|vision_end|>What colour is the square?", "hi"]
    image = [noise_image(50, 80, 5)]
    for key, value in processor(text=text, images=image, return_tensors="pt").items():
        assert torch.equal(value, reloaded(text=text, images=image, return_tensors="pt")[key])


def test_export_into_an_existing_folder_replaces_the_weights(exported, tmp_path):
    model, processor = exported["model"], exported["processor"]
    folder = export_checkpoint(model, processor, tmp_path / "again", max_shard_size="300KB")
    export_checkpoint(model, processor, folder, max_shard_size="100MB")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")) == [
        "model/model.safetensors"
    ]
    loaded = EmmaForConditionalGeneration.from_pretrained(folder)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())


def test_push_to_hub_uploads_the_exported_folder(exported, tmp_path, monkeypatch):
    calls = {}
    remote = tmp_path / "remote"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, kwargs)
        shutil.copytree(folder_path, remote)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = push_to_hub(
        exported["model"], exported["processor"], "emma-org/emma-tiny", private=True, commit_message="first"
    )
    assert result == "commit-info"
    assert calls["create_repo"] == ("emma-org/emma-tiny", {"private": True, "exist_ok": True})
    assert calls["upload_folder"][0] == "emma-org/emma-tiny" and calls["upload_folder"][1]["commit_message"] == "first"
    assert "# emma-tiny" in (remote / "README.md").read_text()
    loaded = AutoModelForImageTextToText.from_pretrained(remote)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in exported["model"].state_dict().items())


def test_export_refuses_wrong_arguments(exported, tmp_path):
    with pytest.raises(TypeError, match="EmmaForConditionalGeneration"):
        export_checkpoint(exported["model"].model, exported["processor"], tmp_path / "x")
    with pytest.raises(TypeError, match="EmmaProcessor"):
        export_checkpoint(exported["model"], exported["processor"].tokenizer, tmp_path / "x")
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        export_checkpoint(exported["model"], exported["processor"], afile)


def test_plain_save_pretrained_also_writes_remote_code_and_auto_map(exported, tmp_path):
    exported["model"].save_pretrained(tmp_path / "model", max_shard_size="300KB")
    exported["processor"].save_pretrained(tmp_path / "processor")
    assert {"configuration_emma.py", "modeling_emma.py"} <= {p.name for p in (tmp_path / "model").iterdir()}
    assert len(list((tmp_path / "model").glob("model-*.safetensors"))) >= 4
    assert "processing_emma.py" in {p.name for p in (tmp_path / "processor").iterdir()}
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_emma.EmmaForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_emma.EmmaConfig"


def test_the_backbone_loads_from_an_export_without_a_load_report(exported):
    """`AutoModel` gives the backbone, which leaves the exported velocity head out by design: nothing to report."""
    with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
        backbone = AutoModel.from_pretrained(exported["folder"])
    assert type(backbone) is EmmaModel and captured.out == ""


def test_an_export_without_remote_code_loads_with_the_installed_package(exported, tmp_path):
    folder = export_checkpoint(exported["model"], exported["processor"], tmp_path / "plain", remote_code=False)
    assert not list(folder.rglob("*.py")) and not (folder / "model_index.json").exists()
    assert not [path.name for path in folder.rglob("*.json") if '"auto_map"' in path.read_text()]
    assert sorted(path.name for path in folder.glob("*.safetensors")) == ["model.safetensors"]
    card = (folder / "README.md").read_text()
    assert "custom_code" not in card and "trust_remote_code" not in card
    # trust_remote_code=True finds no code to trust and uses the installed classes, as for any model transformers has.
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model) is EmmaForConditionalGeneration and type(processor) is EmmaProcessor
    expected = chat_tokens(exported["model"], exported["processor"], exported["image"])
    assert chat_tokens(model, processor, exported["image"]) == expected
