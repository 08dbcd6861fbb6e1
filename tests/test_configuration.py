"""EmmaConfig: presets, save/load round trip and refusal of impossible settings."""

import json

import pytest
from transformers import AutoConfig, Qwen3Config, Siglip2VisionConfig

from emma_hf import EmmaConfig
from emma_hf.configuration_emma import DECOUPLABLE_MODULES


def test_round_trip_is_unchanged(tmp_path):
    config = EmmaConfig.from_preset("tiny", num_shallow_layers=1, shallow_decoupled_modules=["v_proj", "mlp"])
    config.save_pretrained(tmp_path)
    loaded = EmmaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.text_config, Qwen3Config) and isinstance(loaded.vision_config, Siglip2VisionConfig)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "emma"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EmmaConfig)


def test_presets_and_defaults():
    emma_4b = EmmaConfig.from_preset("emma-4b")
    assert emma_4b.text_config.num_hidden_layers == 36 and emma_4b.num_shallow_layers == 18
    assert emma_4b.vision_moe_layers == [22, 23, 24, 25, 26]
    assert emma_4b.image_grid_size == 32 and emma_4b.tie_word_embeddings
    assert emma_4b.decoupled_modules(0) == ("v_proj",)
    assert emma_4b.decoupled_modules(18) == DECOUPLABLE_MODULES
    literal = EmmaConfig.from_preset("emma-4b-literal")
    assert literal.text_config.to_dict() == emma_4b.text_config.to_dict()
    assert literal.decoupled_modules(0) == () and literal.decoupled_modules(35) == (
        "v_proj",
        "o_proj",
        "post_attention_layernorm",
        "mlp",
    )
    with pytest.raises(
        ValueError, match=r"unknown preset 'emma-7b'; available: \['emma-4b', 'emma-4b-literal', 'tiny'\]"
    ):
        EmmaConfig.from_preset("emma-7b")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_shallow_layers": 5}, "num_shallow_layers"),
        ({"num_shallow_layers": -1}, "num_shallow_layers"),
        ({"shallow_decoupled_modules": ["v_proj", "w_proj"]}, "shallow_decoupled_modules"),
        ({"deep_decoupled_modules": ["mlp", "ffn"]}, "deep_decoupled_modules"),
        ({"vision_moe_layers": [1, 3]}, "vision_moe_layers"),
        ({"vision_moe_layers": [1, 1]}, "vision_moe_layers"),
        ({"vision_num_experts": 0}, "vision_num_experts"),
        ({"vision_router_mode": "top2"}, "vision_router_mode"),
        ({"vision_router_mode": "stem", "vision_num_experts": 1}, "vision_router_mode"),
        ({"vision_unshuffle_factor": 1}, "vae_config"),
        ({"image_token_id": 400}, "image_token_id"),
        ({"gen_token_id": 310}, "special token ids"),
        ({"flow_logit_std": 0.0}, "flow_logit_std"),
        ({"flow_weighting_scheme": "cosmap"}, "flow_weighting_scheme"),
        ({"fm_weight": -1.0}, "fm_weight"),
        ({"image_position_scale": 0.0}, "image_position_scale"),
    ],
)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        EmmaConfig.from_preset("tiny", **overrides)


def test_vae_downsampling_must_match_the_encoder_grid():
    tiny_vae = EmmaConfig.from_preset("tiny").vae_config
    five_stage_vae = {**tiny_vae, "encoder_block_out_channels": [8, 8, 16, 16, 32]}
    with pytest.raises(
        ValueError, match=r"vae_config downsamples by 16 .*\.patch_size \* vision_unshuffle_factor = 16 \* 2"
    ):
        EmmaConfig.from_preset("tiny", vae_config=five_stage_vae)


def test_image_token_count_rejects_sizes_off_the_grid():
    config = EmmaConfig.from_preset("tiny")
    assert config.num_image_tokens(512, 512) == 256
    with pytest.raises(ValueError, match="multiples of 32"):
        config.num_image_tokens(500, 512)
