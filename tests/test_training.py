"""Training: data formats and collator, stage presets, LoRA presets, the Trainer recipe, resuming."""

import json
import logging
import warnings

import pytest
import torch
import transformers
from builders import images_of, noise_image, tiny_chat_model, tiny_processor, write_toy_dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from emma_hf import EmmaImageProcessor, EmmaPipeline, EmmaProcessor
from emma_hf.processing_emma import UnknownWordsWarning
from emma_hf.training import (
    STAGES,
    DataError,
    EmmaCollator,
    EmmaSample,
    JsonlDataset,
    TaskMixture,
    apply_stage,
    emma_lora_config,
    get_stage,
    lora_target_modules,
)
from emma_hf.training.lora import is_generation_module


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"))


def mixed_batch(toy, model, processor, noise_seed=0, indices=(0, 1, 2)):
    mixture = TaskMixture({task: JsonlDataset(path, task) for task, path in toy.items()})
    return EmmaCollator(processor, model.config, noise_seed)([mixture[i] for i in indices])


def test_collator_labels_only_assistant_text_and_expands_images(toy):
    model, processor = tiny_chat_model(seed=0)
    batch = mixed_batch(toy, model, processor)
    tokenizer = processor.tokenizer
    decoded_labels = [tokenizer.decode(row[row >= 0]) for row in batch["labels"]]
    assert decoded_labels == [
        "The square is red.<|im_end|>",
        "<|gen_start|><|vision_start|><|im_end|>",
        "<|gen_start|><|vision_start|><|im_end|>",
    ]
    config = model.config
    assert (batch["input_ids"] == config.image_token_id).sum(-1).tolist() == [4, 0, 4]
    assert (batch["input_ids"] == config.gen_token_id).sum(-1).tolist() == [0, 4, 4]
    assert batch["target_pixel_values"].shape == (2, 3, 64, 64)
    assert [image.shape for image in images_of(batch, "pixel_values")] == [(3, 64, 64)] * 2
    mask = batch["attention_mask"]
    assert bool((mask.diff(dim=-1) <= 0).all()) and mask[:, 0].all() and not mask.all()
    assert bool((batch["labels"][mask == 0] == -100).all())
    assert bool((batch["input_ids"][mask == 0] == processor.tokenizer.pad_token_id).all())
    again = mixed_batch(toy, model, processor)
    assert all(torch.equal(a, b) for a, b in zip(batch["noise"], again["noise"]))
    assert not torch.equal(batch["noise"][0], mixed_batch(toy, model, processor, noise_seed=1)["noise"][0])
    output = model(**batch)
    assert output.ce_loss is not None and output.fm_loss is not None


def test_mixture_follows_the_ratios():
    datasets = {"understanding": list(range(3)), "text_to_image": list(range(5)), "edit": list(range(2))}
    even = TaskMixture({task: [{"task": task, "n": n} for n in items] for task, items in datasets.items()})
    assert [even.schedule[i][0] for i in range(6)] == ["understanding", "text_to_image", "edit"] * 2
    assert len(even) == 15
    skewed = TaskMixture(
        {task: [{"task": task}] * len(items) for task, items in datasets.items()},
        {"understanding": 2, "text_to_image": 1},
        num_samples=30,
    )
    tasks = [task for task, _ in skewed.schedule]
    assert tasks.count("understanding") == 20 and tasks.count("text_to_image") == 10 and "edit" not in tasks
    with pytest.raises(ValueError, match="task ratios"):
        TaskMixture({"edit": [1]}, {"understanding": 1})


def test_bad_lines_name_file_and_line_and_can_be_skipped(tmp_path, toy, caplog):
    path = tmp_path / "edit.jsonl"
    good = toy["edit"].read_text().splitlines()[0].replace('"images/', f'"{toy["edit"].parent}/images/')
    path.write_text(good + "\n" + json.dumps({"image": "a.png", "target": "b.png"}) + "\n\n{not json\n" + good + "\n")
    strict = JsonlDataset(path, "edit")
    assert len(strict) == 4
    with pytest.raises(DataError, match=rf"{path}:2: edit samples need the field 'instruction'"):
        strict[1]
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON"):
        strict[2]
    lenient = JsonlDataset(path, "edit", on_error="skip")
    with caplog.at_level("WARNING", logger="emma_hf.training.data"):
        assert lenient[1]["instruction"] == strict[0]["instruction"]
    assert [record.getMessage() for record in caplog.records] == [
        f"skipping a bad sample: {path}:2: edit samples need the field 'instruction' (str)",
        f"skipping a bad sample: {path}:4: not valid JSON (Expecting property name enclosed in double quotes)",
    ]
    missing = tmp_path / "t2i.jsonl"
    missing.write_text(json.dumps({"prompt": "x", "image": "nowhere.png"}) + "\n")
    with pytest.raises(DataError, match=r"t2i.jsonl:1: image file not found: .*nowhere.png"):
        JsonlDataset(missing, "text_to_image")[0]
    with pytest.raises(ValueError, match="task must be one of"):
        JsonlDataset(path, "captioning")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|gen_pad|>", "<|im_end|>\n<|im_start|>assistant"])
def test_special_tokens_typed_in_training_text_are_refused_not_an_end_of_epoch(tmp_path, toy, token):
    """Read as structure they would add placeholders (the collator raised StopIteration: the Trainer stopped)."""
    lines = toy["edit"].read_text().splitlines()[:2]
    records = [json.loads(line.replace('"images/', f'"{toy["edit"].parent}/images/')) for line in lines]
    records[0]["instruction"] += f" {token}"
    path = tmp_path / "edit.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: the text holds .*special tokens"):
        JsonlDataset(path, "edit")[0]
    assert JsonlDataset(path, "edit", on_error="skip")[0]["instruction"] == records[1]["instruction"]
    model, processor = tiny_chat_model(seed=0)
    sample = {**JsonlDataset(path, "edit", on_error="skip")[0], "instruction": records[0]["instruction"]}
    with pytest.raises(ValueError, match="special tokens of EMMA's chat format"):
        EmmaCollator(processor, model.config)([sample])


EXPECTED_TRAINABLE = {
    "align": lambda name: name.startswith("model.und_adapter."),
    "pretrain": lambda name: not name.startswith("model.vae."),
    "sft": lambda name: not name.startswith("model.vae."),
    "quality": lambda name: not name.startswith("model.vae."),
    "moe-expert": lambda name: ".mlp.experts.1." in name,
    "moe-router": lambda name: name.startswith("model.vision_tower.router."),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_trains_exactly_its_parameters(stage, toy):
    model, processor = tiny_chat_model(seed=1)
    trainable = apply_stage(model, stage)
    names = [name for name, _ in model.named_parameters()]
    assert trainable == [name for name in names if EXPECTED_TRAINABLE[stage](name)] and trainable
    assert not any(name.startswith("model.vae.") for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**mixed_batch(toy, model, processor)).loss.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in trainable:
            # Routing decides which expert runs: the stage's router mode leaves the unused expert and router idle.
            idle = stage in ("align", "pretrain", "sft", "quality") and (".mlp.experts.1." in name or "router" in name)
            assert idle or not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), name
    assert get_stage(2).name == "sft" and get_stage("4").name == "moe-expert"
    with pytest.raises(ValueError, match="unknown stage 'warmup'"):
        get_stage("warmup")


def text_logits(model, processor):
    ids = processor.tokenizer(["What colour is the square?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_generation_preset_leaves_chat_untouched(toy, tmp_path):
    model, processor = tiny_chat_model(seed=2)
    reference = text_logits(model, processor)
    targets = lora_target_modules(model, "generation")
    assert targets and all(
        ".gen." in name or name.startswith(("model.gen_adapter", "model.time_embed", "velocity_head"))
        for name in targets
    )
    peft_model = get_peft_model(model, emma_lora_config(model, "generation", r=4, lora_alpha=8))
    peft_model.activation_checkpointing_enable()
    peft_model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(**mixed_batch(toy, model, processor)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    assert torch.equal(text_logits(peft_model, processor), reference)
    batch = mixed_batch(toy, model, processor)
    with torch.no_grad():
        adapted = peft_model(**batch).velocity
        with peft_model.disable_adapter():
            plain = peft_model(**batch).velocity
    assert not torch.allclose(adapted, plain)

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = tiny_chat_model(seed=2)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).velocity, adapted)
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).velocity, adapted, atol=1e-5, rtol=0)


def test_a_naive_lora_target_list_adapts_both_streams_and_the_vision_tower(toy):
    """What the README warns of: PEFT matches `q_proj`/`v_proj` everywhere, so drawing data moves chat answers."""
    from peft import LoraConfig

    model, processor = tiny_chat_model(seed=2)
    reference = text_logits(model, processor)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and module.lora_A]
    assert any("vision_tower" in name for name in adapted)
    decoder = [name for name in adapted if ".language_model." in name]
    assert any(".gen." in name for name in decoder) and any(".gen." not in name for name in decoder)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    drawings = JsonlDataset(toy["text_to_image"], "text_to_image")
    collator = EmmaCollator(processor, model.config, noise_seed=0)
    for _ in range(2):
        peft_model(**collator([drawings[i] for i in range(len(drawings))])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    assert not torch.allclose(text_logits(peft_model, processor), reference)


def test_named_adapters_switch(toy):
    model, processor = tiny_chat_model(seed=3)
    peft_model = get_peft_model(model, emma_lora_config(model, "generation", r=4), adapter_name="edits")
    peft_model.add_adapter("chat", emma_lora_config(model, "understanding", r=4))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    peft_model.eval()
    batch = mixed_batch(toy, model, processor)
    outputs = {}
    for adapter in ("edits", "chat"):
        peft_model.set_adapter(adapter)
        with torch.no_grad():
            outputs[adapter] = peft_model(**batch)
    assert not torch.equal(outputs["edits"].velocity, outputs["chat"].velocity)
    assert not torch.equal(outputs["edits"].logits, outputs["chat"].logits)
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        lora_target_modules(model, "vision")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_several_adapters_reports_only_each_adapters_own_missing_weights(tmp_path):
    """
    transformers lists weights holding the adapter's name as MISSING: 5.23 the first adapter's (and, for a short name,
    base weights), 5.25 the `gen` stream's for an adapter named "gen".
    """
    for name, task in (
        ("a", "generation"),
        ("gen", "generation"),
        ("default", "understanding"),
        ("damaged", "generation"),
    ):
        model, _ = tiny_chat_model(seed=0)
        get_peft_model(model, emma_lora_config(model, task, r=4)).save_pretrained(tmp_path / name)
    weights = load_file(tmp_path / "damaged" / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "damaged" / "adapter_model.safetensors")

    model, _ = tiny_chat_model(seed=0)
    records = Records()
    library_logger = transformers.utils.logging.get_logger("transformers")
    library_logger.addHandler(records)
    try:
        infos = [model.load_adapter(tmp_path / name, adapter_name=name) for name in ("a", "gen", "default")]
        assert [info.missing_keys for info in infos] == [set(), set(), set()]
        assert not any("MISSING" in message for message in records.messages), records.messages
        (missing,) = model.load_adapter(tmp_path / "damaged", adapter_name="third").missing_keys
    finally:
        library_logger.removeHandler(records)
    assert missing.replace(".third.", ".") == dropped.removeprefix("base_model.model.")
    assert any("MISSING" in message and missing in message for message in records.messages)


def test_training_data_may_teach_a_closed_vocabulary_new_words(toy):
    """The processor warns users about words outside `known_words`; training on new words is no reason to."""
    model, processor = tiny_chat_model()
    processor.known_words = ["the"]
    samples = [{"task": "text_to_image", "prompt": "a cat", "target": noise_image(32, 32, 1), "index": 0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = EmmaCollator(processor, model.config)(samples)
    assert batch["target_pixel_values"].shape == (1, 3, 32, 32)
    with pytest.warns(UnknownWordsWarning, match="'a', 'cat'"):
        processor.generation_prompt("a cat")


def test_context_images_are_read_within_the_pixel_budget_and_targets_are_not():
    model, _ = tiny_chat_model()
    processor = tiny_processor(max_pixels=128 * 128)
    sample = {**edit_sample(0), "images": [noise_image(128, 128, 0)], "target": noise_image(128, 128, 1)}
    batch = EmmaCollator(processor, model.config, max_context_pixels=64 * 64)([sample])
    assert [image.shape for image in images_of(batch)] == [(3, 64, 64)]
    assert batch["pixel_values"].shape == batch["vae_pixel_values"].shape
    assert batch["target_pixel_values"].shape[-2:] == (128, 128)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 4  # a 2x2 token grid
    assert model(**batch).loss.isfinite()
    unbudgeted = EmmaCollator(processor, model.config)([sample])
    assert [image.shape for image in images_of(unbudgeted)] == [(3, 128, 128)]

    fixed_size = EmmaProcessor(EmmaImageProcessor(size={"height": 96, "width": 160}), processor.tokenizer)
    assert EmmaCollator(fixed_size, model.config, max_context_pixels=64 * 96).context_size == {
        "height": 64,
        "width": 96,
    }
    assert EmmaCollator(fixed_size, model.config, max_context_pixels=96 * 160).context_size is None
    with pytest.raises(
        ValueError, match=r"max_context_pixels must be an integer of at least patch_size\*\*2 \(1024\)"
    ):
        EmmaCollator(processor, model.config, max_context_pixels=100)


def edit_sample(index: int, instruction: str = "Make the square red.") -> dict:
    return {
        "task": "edit",
        "instruction": instruction,
        "images": [noise_image(64, 64, index)],
        "target": noise_image(64, 64, index + 1),
        "index": index,
    }


def test_condition_dropout_holds_its_rates_and_is_reproducible_by_seed():
    model, processor = tiny_chat_model()
    collator = EmmaCollator(processor, model.config, text_dropout=0.1, image_dropout=0.3, dropout_seed=5)
    samples = [collator.with_condition_dropout(edit_sample(index)) for index in range(4000)]
    no_text = sum(sample.get("instruction", sample.get("prompt")) == "" for sample in samples) / len(samples)
    no_image = sum(sample["task"] == "text_to_image" for sample in samples) / len(samples)
    assert abs(no_text - 0.1) < 0.015 and abs(no_image - 0.3) < 0.025  # about 3 standard errors
    both = sum(sample["task"] == "text_to_image" and sample["prompt"] == "" for sample in samples) / len(samples)
    assert abs(both - 0.03) < 0.01  # independent draws

    again = [collator.with_condition_dropout(edit_sample(index)) for index in range(4000)]
    assert [s["task"] for s in again] == [s["task"] for s in samples]
    other_seed = EmmaCollator(processor, model.config, text_dropout=0.1, image_dropout=0.3, dropout_seed=6)
    assert [other_seed.with_condition_dropout(edit_sample(i))["task"] for i in range(4000)] != [
        s["task"] for s in samples
    ]
    understanding = {"task": "understanding", "messages": [], "images": [], "index": 3}
    assert (
        EmmaCollator(processor, model.config, text_dropout=1.0).with_condition_dropout(understanding) is understanding
    )
    with pytest.raises(ValueError, match=r"image_dropout must be a probability in \[0, 1\], got 1.5"):
        EmmaCollator(processor, model.config, image_dropout=1.5)


@pytest.mark.parametrize("dropped", ["text", "image"])
def test_a_dropped_condition_is_the_branch_the_pipeline_encodes(dropped, monkeypatch):
    """Training sees the unconditional branches token for token as classifier-free guidance asks for them."""
    model, processor = tiny_chat_model()
    sample = edit_sample(0)
    rates = {"text_dropout": float(dropped == "text"), "image_dropout": float(dropped == "image")}
    batch = EmmaCollator(processor, model.config, **rates)([sample])
    trained = batch["input_ids"][0, batch["attention_mask"][0].bool()].tolist()

    pipe = EmmaPipeline.from_model(model, processor)
    encoded = {}
    encode_context = model.encode_context

    def capture(input_ids, attention_mask, **kwargs):
        encoded["rows"] = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        encoded.update(kwargs)
        return encode_context(input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(model, "encode_context", capture)
    pipe.encode_prompt([sample["instruction"]], sample["images"], [""], do_text_guidance=True, do_image_guidance=True)
    branch = encoded["rows"][1 if dropped == "text" else 2]  # rows: full, no text, no image
    assert trained[: len(branch)] == branch and trained[len(branch)] == model.config.gen_token_id
    if dropped == "image":
        assert "pixel_values" not in batch
    else:
        # The pipeline's context holds the source image in the full and the no-text rows: the second is row 1's.
        assert torch.equal(images_of(batch, "pixel_values")[0], images_of(encoded, "pixel_values")[1])


def moe_experts(model) -> list:
    return [layer.mlp.experts for layer in model.model.vision_tower.encoder.layers if hasattr(layer.mlp, "experts")]


def test_a_stages_router_mode_holds_while_training_and_is_never_saved(toy, tmp_path):
    model, processor = tiny_chat_model(seed=1, vision_router_mode="versatile")
    apply_stage(model, "moe-expert")
    assert model.train().model.router_mode == "stem" and model.eval().model.router_mode == "versatile"
    model.save_pretrained(tmp_path / "expert")
    saved = json.loads((tmp_path / "expert" / "config.json").read_text())
    assert saved["vision_router_mode"] == "versatile" and "training_router_mode" not in saved

    apply_stage(model, "moe-router")  # router tuning trains top-1 routing, as inference routes
    assert model.train().model.router_mode == "top1" and model.config.vision_router_mode == "top1"
    model.save_pretrained(tmp_path / "router")
    assert json.loads((tmp_path / "router" / "config.json").read_text())["vision_router_mode"] == "top1"
    reloaded = type(model).from_pretrained(tmp_path / "router").train()
    assert reloaded.model.training_router_mode is None and reloaded.model.router_mode == "top1"


@pytest.mark.parametrize("reinitialize", [True, False])
def test_expert_tuning_starts_the_stem_expert_from_the_tuned_versatile_expert(reinitialize):
    model, _ = tiny_chat_model(seed=1)
    with torch.no_grad():
        for experts in moe_experts(model):
            experts[0].fc1.weight.add_(1.0)  # what stages 1-3 tuned; the STEM copy went stale
    stale = [experts[1].fc1.weight.clone() for experts in moe_experts(model)]
    apply_stage(model, "moe-expert", reinitialize_stem_expert=reinitialize)
    for experts, old in zip(moe_experts(model), stale):
        expected = experts[0].fc1.weight if reinitialize else old
        assert torch.equal(experts[1].fc1.weight, expected)
        assert torch.equal(experts[1].fc2.bias, experts[0].fc2.bias) or not reinitialize


def test_the_plain_trainer_trains_with_default_arguments(toy, tmp_path):
    """`remove_unused_columns=True` (the default) strips dict samples to `forward`'s names; `EmmaSample` stays whole."""
    from transformers import Trainer, TrainingArguments

    model, processor = tiny_chat_model(seed=0)
    mixture = TaskMixture({task: JsonlDataset(path, task) for task, path in toy.items()})
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    arguments = TrainingArguments(
        tmp_path, max_steps=2, per_device_train_batch_size=3, use_cpu=True, report_to=[], save_strategy="no"
    )
    assert arguments.remove_unused_columns
    trainer = Trainer(model, arguments, train_dataset=mixture, data_collator=EmmaCollator(processor, model.config))
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    assert any("velocity_head" in name for name in moved) and any(
        "lm_head" in name or "embed" in name for name in moved
    )


def test_dict_samples_stripped_by_the_trainer_get_a_clear_error(toy):
    model, processor = tiny_chat_model(seed=0)
    collator = EmmaCollator(processor, model.config)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        collator([{"input_ids": [1, 2]}])
    sample = JsonlDataset(toy["edit"], "edit")[0]
    assert isinstance(sample, EmmaSample) and not isinstance(sample, dict)
    assert collator([sample])["input_ids"].shape == collator([dict(sample)])["input_ids"].shape


def parameters_without_gradient(model, batch) -> set[str]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.any())
    }


def test_parameters_without_gradient_are_the_stream_and_experts_a_batch_does_not_use(toy):
    """
    A documented property (docs/architecture.md, "Training"): a batch with nothing to draw leaves the generation
    stream without gradient, and top-1 routing leaves the expert it did not pick; everything else always learns.
    """
    model, processor = tiny_chat_model(seed=0)
    model.train()
    mixture = TaskMixture({task: JsonlDataset(path, task) for task, path in toy.items()})
    collator = EmmaCollator(processor, model.config, noise_seed=0)
    samples = [mixture[i] for i in range(6)]
    chat_only = collator([sample for sample in samples if sample["task"] == "understanding"])
    generation_stream = {
        name
        for name, _ in model.named_parameters()
        if is_generation_module(name) or name == "model.language_model.gen_norm.weight"
    }
    model.model.training_router_mode = "soft"  # every expert runs
    assert parameters_without_gradient(model, chat_only) == generation_stream
    assert parameters_without_gradient(model, collator(samples)) == set()
    model.model.training_router_mode = "top1"
    unused = parameters_without_gradient(model, collator(samples))
    assert unused and all(".mlp.experts." in name for name in unused)
    assert not any(".router." in name for name in unused)
