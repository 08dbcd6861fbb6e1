"""
Building EMMA from public component checkpoints, and Hub checkpoints: one folder that `AutoModel`/`AutoProcessor` read (with or without `emma_hf` installed) and that
`EmmaPipeline` will read too, holding ONE copy of the weights.

Layout written by [`export_checkpoint`]:

    config.json, generation_config.json     the model's config, `auto_map` naming the remote-code classes
    model.safetensors.index.json            maps every weight to its shard under `model/`
    *.py                                    the remote code: configuration, modeling, processing (flat, at the root,
                                            where transformers fetches code from)
    processor_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja
    README.md                               the model card, from `model_card.md`
    model/                                  config.json, generation_config.json and the safetensors shards (with
                                            their own index when sharded): the pipeline's `model` component
"""

import json
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderDC
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration_emma import EmmaConfig
from .modeling_emma import EmmaForConditionalGeneration
from .pipeline_emma import scheduler_from_model_config
from .processing_emma import EmmaImageProcessor, EmmaProcessor
from .sizes import parameter_report


MODEL_SUBFOLDER = "model"
PROCESSOR_SUBFOLDER = "processor"
SCHEDULER_SUBFOLDER = "scheduler"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Parts of a SigLIP2 checkpoint that EMMA does not use: the text tower of a full model and the pooling head.
UNUSED_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias", "head.")
# Weights that EMMA adds to its components and initialises itself: the gen stream, the extra experts, the router,
# adapters, timestep embedding and velocity head.
ADDED_BY_EMMA = re.compile(
    r"\.gen\.|gen_norm|mlp\.experts\.[1-9]|vision_tower\.router\.|und_adapter\.|gen_adapter\.|time_embed\.|^velocity_head\."
)
HUB_TAGS = ["emma", "any-to-any", "image-text-to-text", "text-to-image", "image-editing", "custom_code"]
# Model card texts an exporter should replace with what it knows (`export_checkpoint(..., intended_use=...)`).
CARD_DEFAULTS = {
    "intended_use": (
        "Research on unified multimodal models: answering questions about images, drawing images from text, editing "
        "images from instructions, and fine-tuning for these tasks. Not intended for decisions about people or for "
        "uses where a wrong answer or image causes harm; disclose generated and edited images as such."
    ),
    "training": "Not stated by the exporter: describe the data, stages and steps this checkpoint was trained with.",
    "limitations": (
        "Answers can be wrong and images can miss parts of the prompt; the model carries the biases of its training "
        "data. Not stated further by the exporter: describe the known failure modes here."
    ),
}


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
    head's output at zero, and the tokenizer extended with EMMA's special tokens. `config_overrides` go to
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

    processor = EmmaProcessor(image_processor or EmmaImageProcessor(), AutoTokenizer.from_pretrained(llm))
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


def sync_special_tokens(model: EmmaForConditionalGeneration, processor: EmmaProcessor) -> None:
    """
    Make the model use the processor's token ids: EMMA's special-token ids go into `model.config`, the embeddings grow
    if the tokenizer outgrew them, and generation stops at the end of the assistant's turn.
    """
    if processor.image_processor.patch_size != model.config.image_grid_size:
        raise ValueError(
            f"the image processor's patch_size ({processor.image_processor.patch_size}) must equal the model's "
            f"token cell ({model.config.image_grid_size} pixels)"
        )
    for field, token_id in processor.emma_token_ids.items():
        setattr(model.config, field, token_id)
    vocab_size = len(processor.tokenizer)
    if vocab_size > model.config.text_config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    tokenizer = processor.tokenizer
    end_ids = [processor.end_of_turn_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in end_ids:
        end_ids.append(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = end_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.validate_emma()


def model_card(model: EmmaForConditionalGeneration, repo_id: str, **card_fields) -> ModelCard:
    """
    The model card of an exported checkpoint (`model_card.md` filled in): Hub metadata, this model's sizes and
    configured design choices, and the texts in `card_fields` (`intended_use`, `training`, `limitations`; defaults in
    `CARD_DEFAULTS`) with `license`, `base_model` and `model_name` for the metadata.
    """
    config = model.config
    text, vision = config.text_config, config.vision_config
    try:
        emma_hf_version = version("emma_hf")
    except PackageNotFoundError:
        emma_hf_version = "(development)"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="any-to-any",
        tags=HUB_TAGS,
        license=card_fields.pop("license", "apache-2.0"),
        base_model=card_fields.pop("base_model", None),
        model_name=card_fields.pop("model_name", repo_id.split("/")[-1]),
    )
    unknown = sorted(set(card_fields) - set(CARD_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown model card fields {unknown}; allowed: license, base_model, model_name, {', '.join(CARD_DEFAULTS)}"
        )
    if config.flow_use_dynamic_shifting:
        flow_shift = (
            f"shift exp(mu), mu from {config.flow_base_shift} at {config.flow_base_image_seq_len} tokens to "
            f"{config.flow_max_shift} at {config.flow_max_image_seq_len}"
        )
    else:
        flow_shift = f"fixed shift {config.flow_shift}"
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=card_data.model_name,
        repo_id=repo_id,
        emma_hf_version=emma_hf_version,
        parameters=f"{parameter_report(model).total / 1e6:,.1f}M",
        decoder=f"Qwen3, {text.num_hidden_layers} layers, hidden {text.hidden_size} (the first "
        f"{config.num_shallow_layers} share all but {', '.join(config.shallow_decoupled_modules)})",
        vision=f"SigLIP2, {vision.num_hidden_layers} layers, patch {vision.patch_size}, MoE in layers "
        f"{config.vision_moe_layers}",
        vae=f"DC-AE, {config.vae_config['latent_channels']} latent channels, {config.image_grid_size}x downsampling",
        tokens_512=config.num_image_tokens(512, 512),
        num_layers=text.num_hidden_layers,
        num_shallow_layers=config.num_shallow_layers,
        shallow_decoupled_modules=config.shallow_decoupled_modules,
        vision_moe_layers=config.vision_moe_layers,
        vision_num_experts=config.vision_num_experts,
        vision_router_mode=config.vision_router_mode,
        image_position_scale=config.image_position_scale,
        flow_weighting_scheme=config.flow_weighting_scheme,
        flow_shift=flow_shift,
        ce_weight=config.ce_weight,
        fm_weight=config.fm_weight,
        **{**CARD_DEFAULTS, **card_fields},
    )


def export_checkpoint(
    model: EmmaForConditionalGeneration,
    processor: EmmaProcessor,
    save_directory: str | Path,
    *,
    repo_id: str | None = None,
    max_shard_size: int | str = "5GB",
    **card_fields,
) -> Path:
    """
    Write `model` and `processor` as one Hub checkpoint folder (layout in this module's docstring) and return its
    path. `card_fields` go into the model card: `license`, `base_model`, `model_name`, `intended_use`, `training`,
    `limitations` (see [`model_card`]).
    """
    if not isinstance(model, EmmaForConditionalGeneration):
        raise TypeError(f"model must be an EmmaForConditionalGeneration, got {type(model).__name__}")
    if not isinstance(processor, EmmaProcessor):
        raise TypeError(f"processor must be an EmmaProcessor, got {type(processor).__name__}")
    save_directory = Path(save_directory)
    if save_directory.is_file():
        raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder")
    sync_special_tokens(model, processor)
    card = model_card(model, repo_id or save_directory.name, **card_fields)
    save_directory.mkdir(parents=True, exist_ok=True)
    model_directory = save_directory / MODEL_SUBFOLDER

    # Saved aside, then swapped in whole: shards or an index left from an earlier export must not mix with these.
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=save_directory))
    staging.chmod(0o755)  # mkdtemp's private mode would stay on the renamed folder
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    if model_directory.exists():
        shutil.rmtree(model_directory)
    staging.rename(model_directory)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(model_directory / name, save_directory / name)
    for code_file in model_directory.glob("*.py"):
        shutil.move(code_file, save_directory / code_file.name)
    write_root_index(model_directory, save_directory)
    processor.save_pretrained(save_directory)
    write_pipeline_files(model, processor, save_directory)
    card.save(save_directory / "README.md")
    return save_directory


def self_contained_source(module_file: Path) -> str:
    """A remote-code module with `configuration_emma` inlined: diffusers fetches a component's file alone."""
    relative_import = "from .configuration_emma import EmmaConfig\n"
    source = module_file.read_text()
    if relative_import not in source:
        raise RuntimeError(f"{module_file.name} no longer imports EmmaConfig as expected; update the export")
    configuration = (module_file.parent / "configuration_emma.py").read_text()
    return configuration + "\n\n" + source.replace(relative_import, "")


def write_pipeline_files(model: EmmaForConditionalGeneration, processor: EmmaProcessor, save_directory: Path) -> None:
    """What diffusers needs on top of the transformers files: `model_index.json`, the pipeline code, the scheduler,
    the processor in its own folder, and each custom component's code, self-contained, in its subfolder."""
    package = Path(__file__).parent
    shutil.copyfile(package / "pipeline_emma.py", save_directory / "pipeline_emma.py")
    (save_directory / MODEL_SUBFOLDER / "modeling_emma.py").write_text(
        self_contained_source(package / "modeling_emma.py")
    )
    processor_directory = save_directory / PROCESSOR_SUBFOLDER
    if processor_directory.exists():
        shutil.rmtree(processor_directory)
    processor.save_pretrained(processor_directory)
    (processor_directory / "configuration_emma.py").unlink(missing_ok=True)
    (processor_directory / "processing_emma.py").write_text(self_contained_source(package / "processing_emma.py"))
    scheduler_from_model_config(model.config).save_pretrained(save_directory / SCHEDULER_SUBFOLDER)
    model_index = {
        "_class_name": ["pipeline_emma", "EmmaPipeline"],
        "_diffusers_version": diffusers.__version__,
        MODEL_SUBFOLDER: ["modeling_emma", "EmmaForConditionalGeneration"],
        PROCESSOR_SUBFOLDER: ["processing_emma", "EmmaProcessor"],
        SCHEDULER_SUBFOLDER: ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (save_directory / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def write_root_index(model_directory: Path, save_directory: Path) -> None:
    """A root `model.safetensors.index.json` that points into `model/`, so root loaders read the same shards."""
    index_path = model_directory / SAFE_WEIGHTS_INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text())
        weight_map = {key: f"{MODEL_SUBFOLDER}/{shard}" for key, shard in index["weight_map"].items()}
        metadata = index.get("metadata", {})
    else:
        weights_path = model_directory / SAFE_WEIGHTS_NAME
        with safe_open(weights_path, "pt") as weights:
            weight_map = dict.fromkeys(weights.keys(), f"{MODEL_SUBFOLDER}/{SAFE_WEIGHTS_NAME}")
        with weights_path.open("rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
        metadata = {"total_size": weights_path.stat().st_size - 8 - header_size}
    (save_directory / SAFE_WEIGHTS_INDEX_NAME).write_text(
        json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
    )


def push_to_hub(
    model: EmmaForConditionalGeneration,
    processor: EmmaProcessor,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload EMMA checkpoint",
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    **card_fields,
):
    """Export to a temporary folder and upload it with huggingface_hub's `create_repo` + `upload_folder`."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        export_checkpoint(model, processor, folder, repo_id=repo_id, max_shard_size=max_shard_size, **card_fields)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
