"""
Building EMMA from public component checkpoints: a Qwen3 causal LM, a SigLIP2 vision encoder and a diffusers DC-AE,
read as their libraries save them and mapped to EMMA's names (docs/architecture.md, "Weights and names"); and the
way back to a plain Qwen3 for the chat half. Writing the result as a Hub folder is `emma_hf.hub`'s job.
"""

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderDC
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM
from transformers.utils import SAFE_WEIGHTS_NAME

from .configuration_emma import EmmaConfig
from .hub import sync_special_tokens
from .modeling_emma import EmmaForConditionalGeneration
from .processing_emma import EmmaImageProcessor, EmmaProcessor


DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Parts of a SigLIP2 checkpoint that EMMA does not use: the text tower of a full model and the pooling head.
UNUSED_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias", "head.")
# Weights that EMMA adds to its components and initialises itself: the gen stream, the extra experts, the router,
# adapters, timestep embedding and velocity head.
ADDED_BY_EMMA = re.compile(
    r"\.gen\.|gen_norm|mlp\.experts\.[1-9]|vision_tower\.router\.|und_adapter\.|gen_adapter\.|time_embed\.|^velocity_head\."
)


def read_safetensors(source: str | Path, weights_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (local folder or Hub id, one file or shards with an index), keys as saved."""
    folder = Path(source)
    if not folder.is_dir():
        folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))
    index_path = folder / f"{weights_name}.index.json"
    if (folder / weights_name).is_file():
        files = [folder / weights_name]
    elif index_path.is_file():
        files = [folder / shard for shard in sorted(set(json.loads(index_path.read_text())["weight_map"].values()))]
    else:
        pickles = sorted(path.name for path in folder.glob("*.bin"))
        found = f"; its pickle files {pickles} are not read (convert them to safetensors first)" if pickles else ""
        raise FileNotFoundError(f"{str(source)!r} holds neither {weights_name} nor {weights_name}.index.json{found}")
    weights = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{str(source)!r}: the shard {file.name!r} listed in its index is missing")
        try:
            weights.update(load_file(file))
        except SafetensorError as error:
            raise OSError(f"{str(file)!r} is damaged or truncated ({error}); download or save it again") from error
    return weights


def mapped_component_weights(
    config: EmmaConfig, llm_weights: dict, vision_weights: dict, vae_weights: dict
) -> dict[str, torch.Tensor]:
    """The three checkpoints' tensors under EMMA's names (docs/architecture.md, "Weights and names")."""
    mapped = {}
    for key, value in llm_weights.items():
        mapped[key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key] = value
    moe_layers = set(config.vision_moe_layers)
    for key, value in vision_weights.items():
        key = key.removeprefix("vision_model.")
        if key.startswith(UNUSED_VISION_PREFIXES):
            continue
        parts = key.split(".")
        if key.startswith("encoder.layers.") and int(parts[2]) in moe_layers and parts[3] == "mlp":
            key = ".".join([*parts[:4], "experts", "0", *parts[4:]])
        mapped[f"model.vision_tower.{key}"] = value
    mapped.update({f"model.vae.{key}": value for key, value in vae_weights.items()})
    return mapped


def load_component_weights(model: EmmaForConditionalGeneration, weights: dict[str, torch.Tensor]) -> None:
    """
    Load mapped component weights, refusing any key that does not belong, or any EMMA weight left without a value
    except those EMMA adds (gen copies, MoE experts and router, adapters, heads) and a tied `lm_head`. Rows the
    tokenizer added beyond the checkpoint's vocabulary start at the mean of the existing embeddings.
    """
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ValueError(f"the component checkpoints hold weights EMMA has no place for: {unexpected}")
    missing = sorted(
        key
        for key in set(own) - set(weights)
        if not ADDED_BY_EMMA.search(key) and not (key == "lm_head.weight" and model.config.tie_word_embeddings)
    )
    if missing:
        raise ValueError(f"the component checkpoints lack these weights EMMA needs: {missing}")
    with torch.no_grad():
        for key, value in weights.items():
            target = own[key]
            if value.shape == target.shape:
                target.copy_(value)
            elif (
                key in ("model.language_model.embed_tokens.weight", "lm_head.weight")
                and value.shape[1:] == target.shape[1:]
                and value.shape[0] < target.shape[0]
            ):
                target[: value.shape[0]] = value
                target[value.shape[0] :] = value.float().mean(0).to(value.dtype)
            else:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)} in its checkpoint, EMMA expects {tuple(target.shape)}"
                )


@torch.no_grad()
def mean_initialize_tokens(model: EmmaForConditionalGeneration, num_trained_tokens: int, num_tokens: int) -> None:
    """
    Start the rows of the tokens EMMA adds (ids `num_trained_tokens` to `num_tokens`) at the mean of the tokenizer's
    own rows: Qwen3 pads its embeddings beyond its tokenizer (151936 rows for 151669 tokens), so added tokens land on
    padding rows that were never trained.
    """
    matrices = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        matrices.append(model.get_output_embeddings().weight)
    for matrix in matrices:
        matrix[num_trained_tokens:num_tokens] = matrix[:num_trained_tokens].float().mean(0).to(matrix.dtype)


def build_emma_from_components(
    llm: str | Path,
    vision: str | Path,
    vae: str | Path,
    image_processor: EmmaImageProcessor | None = None,
    **config_overrides,
) -> tuple[EmmaForConditionalGeneration, EmmaProcessor]:
    """
    Build EMMA from a Qwen3 causal-LM checkpoint, a SigLIP2 (vision or full) checkpoint and a diffusers
    `AutoencoderDC` checkpoint (folders or Hub ids, as those libraries save them): shared weights copied, the `gen`
    stream initialised from `und`, the STEM expert from the versatile one, adapters and heads fresh with the velocity
    head's output at zero, and the tokenizer extended with EMMA's special tokens, whose rows start at the mean
    embedding. `config_overrides` go to
    [`EmmaConfig`] (e.g. `num_shallow_layers`, `vision_moe_layers`).
    """
    text_config = AutoConfig.from_pretrained(llm)
    if text_config.model_type != "qwen3":
        raise ValueError(f"llm must be a Qwen3 checkpoint, {str(llm)!r} has model_type {text_config.model_type!r}")
    vision_config = AutoConfig.from_pretrained(vision)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    if vision_config.model_type != "siglip2_vision_model":
        raise ValueError(f"vision must be a SigLIP2 checkpoint, {str(vision)!r} is {vision_config.model_type!r}")
    vae_config = {key: value for key, value in AutoencoderDC.load_config(vae).items() if not key.startswith("_")}

    tokenizer = AutoTokenizer.from_pretrained(llm)
    num_trained_tokens = len(tokenizer)
    processor = EmmaProcessor(image_processor or EmmaImageProcessor(), tokenizer)
    text_config = text_config.to_dict()
    text_config["vocab_size"] = max(text_config["vocab_size"], len(processor.tokenizer))
    config = EmmaConfig(
        text_config=text_config,
        vision_config={**vision_config.to_dict(), "vision_use_head": False},
        vae_config=vae_config,
        **{**processor.emma_token_ids, **config_overrides},
    )
    model = EmmaForConditionalGeneration(config)
    weights = mapped_component_weights(
        config,
        read_safetensors(llm, SAFE_WEIGHTS_NAME),
        read_safetensors(vision, SAFE_WEIGHTS_NAME),
        read_safetensors(vae, DIFFUSERS_WEIGHTS_NAME),
    )
    load_component_weights(model, weights)
    mean_initialize_tokens(model, num_trained_tokens, len(processor.tokenizer))
    model.model.initialize_gen_stream_from_und()
    model.model.initialize_experts_from_versatile()
    with torch.no_grad():
        model.velocity_head.linear_2.weight.zero_()
        model.velocity_head.linear_2.bias.zero_()
    model.tie_weights()
    sync_special_tokens(model, processor)
    return model.eval(), processor


def qwen3_from_emma(model: EmmaForConditionalGeneration) -> Qwen3ForCausalLM:
    """
    The chat half of EMMA as a plain `Qwen3ForCausalLM`: the decoder's `und` stream, embeddings and `lm_head`. On
    text it gives EMMA's logits; serving stacks that know Qwen3 can run it without images.
    """
    qwen = Qwen3ForCausalLM(model.config.text_config)
    emma_state = model.state_dict()
    prefix = "model.language_model."
    qwen.load_state_dict(
        {
            key: emma_state["lm_head.weight" if key == "lm_head.weight" else prefix + key.removeprefix("model.")]
            for key in qwen.state_dict()
        }
    )
    return qwen.to(model.dtype).eval()
