"""Building EMMA from Qwen3, SigLIP2 and DC-AE checkpoints saved by their own libraries."""

import json
import re

import pytest
import torch
from builders import tiny_config, tiny_tokenizer
from diffusers import AutoencoderDC
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen3Config,
    Qwen3ForCausalLM,
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

from emma_hf.cli import main
from emma_hf.convert import build_emma_from_components
from emma_hf.modeling_emma import patchify
from emma_hf.testing_utils import random_image


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny Qwen3 (with its tokenizer), a SigLIP2 vision model and a DC-AE, each saved by its library."""
    root = tmp_path_factory.mktemp("components")
    reference = tiny_config()
    torch.manual_seed(0)
    text_config = Qwen3Config(**{**reference.text_config.to_dict(), "vocab_size": 300, "tie_word_embeddings": False})
    qwen = Qwen3ForCausalLM(text_config).eval()
    qwen.save_pretrained(root / "qwen3")
    tiny_tokenizer().save_pretrained(root / "qwen3")
    siglip = Siglip2VisionModel(Siglip2VisionConfig(**reference.vision_config.to_dict())).eval()
    siglip.save_pretrained(root / "siglip2")
    vae = AutoencoderDC(**reference.vae_config).eval()
    vae.save_pretrained(root / "dc-ae")
    return {"root": root, "qwen": qwen, "siglip": siglip, "vae": vae}


def build(components, **overrides):
    root = components["root"]
    return build_emma_from_components(
        root / "qwen3", root / "siglip2", root / "dc-ae", dtype=torch.float32, **overrides
    )


def test_converted_model_keeps_qwen3_and_siglip2_outputs(components):
    model, processor = build(components)
    assert len(processor.tokenizer) == 305 and model.config.text_config.vocab_size == 305
    assert model.config.image_token_id == processor.image_token_id == 300
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 12]])
    with torch.no_grad():
        emma_logits = model(input_ids=input_ids).logits
        qwen_logits = components["qwen"](input_ids=input_ids).logits
    torch.testing.assert_close(emma_logits[..., :300], qwen_logits, atol=1e-5, rtol=0)

    tower = model.model.vision_tower
    patch_size = model.config.vision_config.patch_size
    patches = patchify(random_image(64, 96, seed=3), patch_size)[None]
    mask = torch.ones(1, patches.shape[1], dtype=torch.long)
    shapes = torch.tensor([[4, 6]])
    with torch.no_grad():
        expected = components["siglip"](pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        for mode in ("versatile", "stem"):
            assert torch.equal(tower(patches, mask, shapes, router_mode=mode), expected.last_hidden_state)

    vae_state = components["vae"].state_dict()
    assert all(torch.equal(value, model.model.vae.state_dict()[key]) for key, value in vae_state.items())
    layer = model.model.language_model.layers[-1]
    assert torch.equal(layer.gen.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert not model.velocity_head.linear_2.weight.any() and not model.velocity_head.linear_2.bias.any()


def test_the_model_is_built_in_bfloat16_by_default_from_float32_files(components):
    """Each tensor is read in its file's dtype and cast once; EMMA's own weights are initialised, not left empty."""
    model, _ = build_emma_from_components(*(components["root"] / name for name in ("qwen3", "siglip2", "dc-ae")))
    reference, _ = build(components)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    randomly_initialised = re.compile(r"router|und_adapter|gen_adapter|time_embed|velocity_head\.linear_1")
    for key, value in reference.state_dict().items():
        if not randomly_initialised.search(key):
            assert torch.equal(model.state_dict()[key][:300], value[:300].to(model.dtype)), key
    rotary = model.model.language_model.rotary_emb  # computed in float32, as transformers keeps it
    assert torch.equal(rotary.inv_freq, reference.model.language_model.rotary_emb.inv_freq)
    adapter = model.model.und_adapter.linear_1.weight.float()
    assert (
        adapter.isfinite().all() and 0.01 < adapter.std() < 0.03 and model.model.und_adapter.linear_1.bias.eq(0).all()
    )
    assert model.lm_head.weight is model.get_input_embeddings().weight or not model.config.tie_word_embeddings


def test_new_token_rows_start_at_the_mean_embedding(components):
    model, _ = build(components)
    embeddings = model.get_input_embeddings().weight
    old = components["qwen"].get_input_embeddings().weight
    assert torch.equal(embeddings[:300], old)
    torch.testing.assert_close(embeddings[300:], old.mean(0).expand(5, -1))


def test_a_full_siglip2_checkpoint_works_too(components, tmp_path):
    reference = tiny_config()
    full = Siglip2Model(
        Siglip2Config(
            vision_config=reference.vision_config.to_dict(),
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 64,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
        )
    )
    full.vision_model.load_state_dict(components["siglip"].state_dict())
    full.save_pretrained(tmp_path / "siglip2-full")
    root = components["root"]
    model, _ = build_emma_from_components(
        root / "qwen3", tmp_path / "siglip2-full", root / "dc-ae", dtype=torch.float32
    )
    converted, _ = build(components)
    assert torch.equal(
        model.model.vision_tower.post_layernorm.weight, converted.model.vision_tower.post_layernorm.weight
    )


def test_renamed_or_reshaped_keys_are_named(components, tmp_path):
    broken = tmp_path / "qwen3-broken"
    broken.mkdir()
    for path in (components["root"] / "qwen3").iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.gate_projection.weight"] = weights.pop("model.layers.1.mlp.gate_proj.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    root = components["root"]
    with pytest.raises(ValueError, match=r"model\.language_model\.layers\.1\.mlp\.gate_projection\.weight"):
        build_emma_from_components(broken, root / "siglip2", root / "dc-ae")
    del weights["model.layers.1.mlp.gate_projection.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack .*model\.language_model\.layers\.1\.mlp\.gate_proj\.weight"):
        build_emma_from_components(broken, root / "siglip2", root / "dc-ae")
    weights["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \(3, 3\)"):
        build_emma_from_components(broken, root / "siglip2", root / "dc-ae")
    with pytest.raises(ValueError, match="must be a Qwen3 checkpoint"):
        build_emma_from_components(root / "siglip2", root / "siglip2", root / "dc-ae")


def test_convert_command_writes_an_exported_checkpoint(components, tmp_path):
    root = components["root"]
    output = tmp_path / "emma"
    arguments = [
        "convert",
        "--llm",
        str(root / "qwen3"),
        "--vision",
        str(root / "siglip2"),
        "--vae",
        str(root / "dc-ae"),
    ]
    assert main([*arguments, "--output", str(output), "--num-shallow-layers", "1"]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["num_shallow_layers"] == 1 and config["gen_token_id"] == 303
    assert (output / "model_index.json").exists() and (output / "model").is_dir()


def test_added_tokens_on_padding_rows_start_at_the_mean_of_the_tokenizers_rows(components, tmp_path):
    """As Qwen3-4B: more embedding rows (310) than tokens (300), so EMMA's tokens land on untrained padding rows."""
    root = components["root"]
    text_config = Qwen3Config(**{**components["qwen"].config.to_dict(), "vocab_size": 310})
    torch.manual_seed(1)
    padded = Qwen3ForCausalLM(text_config).eval()
    padded.save_pretrained(tmp_path / "qwen3")
    tiny_tokenizer().save_pretrained(tmp_path / "qwen3")
    model, processor = build_emma_from_components(
        tmp_path / "qwen3", root / "siglip2", root / "dc-ae", dtype=torch.float32
    )
    assert processor.emma_token_ids["gen_start_token_id"] == 304 and model.config.text_config.vocab_size == 310
    for emma_rows, qwen_rows in (
        (model.get_input_embeddings().weight, padded.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, padded.get_output_embeddings().weight),
    ):
        assert torch.equal(emma_rows[:300], qwen_rows[:300]) and torch.equal(emma_rows[305:], qwen_rows[305:])
        torch.testing.assert_close(emma_rows[300:305], qwen_rows[:300].mean(0).expand(5, -1))
