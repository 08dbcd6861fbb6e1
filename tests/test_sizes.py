"""The emma-4b preset builds on the meta device with the sizes of the checkpoints it is made from."""

import torch

from emma_hf import EmmaConfig, EmmaForConditionalGeneration
from emma_hf.modeling_emma import EmmaVisionMoeEncoderLayer
from emma_hf.sizes import parameter_report


QWEN3_4B = 4_022_468_096
SIGLIP2_SO400M_VISION = 412.6e6
DC_AE_F32C32 = 312.25e6


def within_two_percent(value: float, reference: float) -> bool:
    return abs(value - reference) <= 0.02 * reference


def test_emma_4b_on_meta_matches_its_components(capsys):
    config = EmmaConfig.from_preset("emma-4b")
    with torch.device("meta"):
        model = EmmaForConditionalGeneration(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    report = parameter_report(model)
    print(report.table())
    assert "total" in capsys.readouterr().out

    assert within_two_percent(report.und_decoder, QWEN3_4B)
    assert report.gen_decoder_layers == report.und_decoder_layers
    assert within_two_percent(report.vision_active, SIGLIP2_SO400M_VISION)
    assert within_two_percent(report.vae, DC_AE_F32C32)
    assert report.total == sum(p.numel() for p in model.parameters())
    # Five MoE layers add one expert MLP each: about 50M (DESIGN.md).
    moe_layers = [
        layer for layer in model.model.vision_tower.encoder.layers if isinstance(layer, EmmaVisionMoeEncoderLayer)
    ]
    assert len(moe_layers) == 5
    assert 45e6 < report.vision_total - report.vision_active < 55e6
    assert report.active_per_text_token < report.total and report.active_per_gen_token < report.total
