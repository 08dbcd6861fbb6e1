"""Parameter counts of an EMMA model: in total, per component, and active per token of each kind."""

from dataclasses import dataclass

from torch import nn

from .modeling_emma import PART_PATHS, EmmaForConditionalGeneration, EmmaVisionMoeEncoderLayer


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class ParameterReport:
    total: int
    und_decoder: int
    und_decoder_layers: int
    gen_decoder_layers: int
    vision_total: int
    vision_active: int
    vae: int
    active_per_text_token: int
    active_per_gen_token: int

    def table(self) -> str:
        rows = [
            ("total", self.total),
            ("decoder as the und stream sees it (embeddings, layers, norm, lm_head)", self.und_decoder),
            ("decoder layers, und stream", self.und_decoder_layers),
            ("decoder layers, gen stream", self.gen_decoder_layers),
            ("vision encoder, all experts", self.vision_total),
            ("vision encoder, one expert per image", self.vision_active),
            ("DC-AE (frozen)", self.vae),
            ("active per text token", self.active_per_text_token),
            ("active per generated-image token", self.active_per_gen_token),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value / 1e6:>10.2f}M" for name, value in rows)


def parameter_report(model: EmmaForConditionalGeneration) -> ParameterReport:
    """Count parameters without touching their values, so it works on the meta device."""
    backbone = model.model
    language_model = backbone.language_model
    und_layers = gen_layers = 0
    for layer in language_model.layers:
        own = count(layer) - count(layer.gen)
        decoupled_und = sum(count(layer.get_submodule(PART_PATHS[name])) for name in layer.decoupled)
        und_layers += own
        gen_layers += own - decoupled_und + count(layer.gen)
    tied = model.lm_head.weight is language_model.embed_tokens.weight
    und_decoder = (
        count(language_model.embed_tokens)
        + und_layers
        + count(language_model.norm)
        + (0 if tied else count(model.lm_head))
    )
    vision_total = count(backbone.vision_tower)
    inactive_experts = sum(
        count(layer.mlp) - count(layer.mlp.experts[0])
        for layer in backbone.vision_tower.encoder.layers
        if isinstance(layer, EmmaVisionMoeEncoderLayer)
    )
    gen_heads = count(backbone.gen_adapter) + count(backbone.time_embed) + count(model.velocity_head)
    return ParameterReport(
        total=count(model),
        und_decoder=und_decoder,
        und_decoder_layers=und_layers,
        gen_decoder_layers=gen_layers,
        vision_total=vision_total,
        vision_active=vision_total - inactive_experts,
        vae=count(backbone.vae),
        active_per_text_token=und_decoder,
        active_per_gen_token=gen_layers + count(language_model.gen_norm) + gen_heads,
    )
