"""
Building EMMA from public component checkpoints: a Qwen3 causal LM, a SigLIP2 vision encoder and a diffusers DC-AE,
read as their libraries save them and mapped to EMMA's names (docs/architecture.md, "Weights and names"); and the
way back to a plain Qwen3 for the chat half. Writing the result as a Hub folder is `emma_hf.hub`'s job.
"""

import json
import math
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderDC
from huggingface_hub import snapshot_download
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


# safetensors' dtype names (its format specification) as torch dtypes.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Embedding matrices may hold fewer rows in their checkpoint than in EMMA (the tokenizer grew).
GROWABLE_WEIGHTS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file, from the file's header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def safetensors_files(source: str | Path, weights_name: str) -> list[Path]:
    """The weight files of a checkpoint (local folder or Hub id, one file or shards with an index)."""
    folder = Path(source)
    if not folder.is_dir():
        folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))
    index_path = folder / f"{weights_name}.index.json"
    if (folder / weights_name).is_file():
        return [folder / weights_name]
    if not index_path.is_file():
        pickles = sorted(path.name for path in folder.glob("*.bin"))
        found = f"; its pickle files {pickles} are not read (convert them to safetensors first)" if pickles else ""
        raise FileNotFoundError(f"{str(source)!r} holds neither {weights_name} nor {weights_name}.index.json{found}")
    files = [folder / shard for shard in sorted(set(json.loads(index_path.read_text())["weight_map"].values()))]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{str(source)!r}: the shard {file.name!r} listed in its index is missing")
    return files


def stored_tensors(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, read from its header alone (8-byte length, JSON, then the data)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as stream:
            (header_size,) = struct.unpack("<Q", stream.read(8))
            if header_size > size - 8:
                raise ValueError(f"a header of {header_size} bytes in a file of {size}")
            header = json.loads(stream.read(header_size))
        header.pop("__metadata__", None)
        tensors = {}
        for key, info in header.items():
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (8 + header_size + offset for offset in info["data_offsets"])
            shape = tuple(info["shape"])
            if end > size or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{key} lies outside the file or has the wrong length")
            tensors[key] = StoredTensor(file, dtype, shape, begin, end)
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise OSError(f"{str(file)!r} is damaged or truncated ({error!r}); download or save it again") from error
    return tensors


def emma_weight_names(
    config: EmmaConfig, llm: dict[str, StoredTensor], vision: dict[str, StoredTensor], vae: dict[str, StoredTensor]
) -> dict[str, StoredTensor]:
    """The three checkpoints' tensors under EMMA's names (docs/architecture.md, "Weights and names")."""
    mapped = {}
    for key, stored in llm.items():
        mapped[key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key] = stored
    moe_layers = set(config.vision_moe_layers)
    for key, stored in vision.items():
        key = key.removeprefix("vision_model.")
        if key.startswith(UNUSED_VISION_PREFIXES):
            continue
        parts = key.split(".")
        if key.startswith("encoder.layers.") and int(parts[2]) in moe_layers and parts[3] == "mlp":
            key = ".".join([*parts[:4], "experts", "0", *parts[4:]])
        mapped[f"model.vision_tower.{key}"] = stored
    mapped.update({f"model.vae.{key}": stored for key, stored in vae.items()})
    return mapped


def check_component_weights(model: EmmaForConditionalGeneration, weights: dict[str, StoredTensor]) -> None:
    """
    Refuse any stored tensor that does not belong or has the wrong shape, and any EMMA weight left without one
    except those EMMA adds (gen copies, MoE experts and router, adapters, heads) and a tied `lm_head`. Shapes only:
    `model` may be on the meta device.
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
    for key, stored in weights.items():
        target = tuple(own[key].shape)
        grows = key in GROWABLE_WEIGHTS and stored.shape[1:] == target[1:] and stored.shape[0] <= target[0]
        if stored.shape != target and not grows:
            raise ValueError(f"{key} has shape {stored.shape} in its checkpoint, EMMA expects {target}")


@torch.no_grad()
def load_component_weights(model: EmmaForConditionalGeneration, weights: dict[str, StoredTensor]) -> None:
    """
    Read each stored tensor straight into its EMMA tensor with plain file reads: no memory map (whose pages count
    as the process's memory while a file is open) and no second copy, except a tensor's own when its dtype
    differs. Rows an embedding matrix has beyond its checkpoint's start at the mean of the stored rows.
    """
    own = model.state_dict()
    by_file = defaultdict(list)
    for key, stored in weights.items():
        by_file[stored.file].append((key, stored))
    for file, tensors in by_file.items():
        with open(file, "rb") as stream:
            for key, stored in sorted(tensors, key=lambda item: item[1].start):
                target = own[key]
                rows = target[: stored.shape[0]] if stored.shape != tuple(target.shape) else target
                destination = rows if stored.dtype == target.dtype else torch.empty(stored.shape, dtype=stored.dtype)
                stream.seek(stored.start)
                if stream.readinto(destination.view(-1).view(torch.uint8).numpy()) != stored.end - stored.start:
                    raise OSError(f"{str(file)!r} is truncated at {key}; download or save it again")
                if destination is not rows:
                    rows.copy_(destination)
                if rows.shape != target.shape:
                    target[stored.shape[0] :] = mean_row(rows)


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
        matrix[num_trained_tokens:num_tokens] = mean_row(matrix[:num_trained_tokens])


def mean_row(matrix: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The mean of a matrix's rows, summed in float32 a block at a time: no float copy of a whole embedding."""
    total = torch.zeros(matrix.shape[1], dtype=torch.float32)
    for start in range(0, matrix.shape[0], block):
        total += matrix[start : start + block].sum(0, dtype=torch.float32)
    return (total / matrix.shape[0]).to(matrix.dtype)


def build_emma_from_components(
    llm: str | Path,
    vision: str | Path,
    vae: str | Path,
    image_processor: EmmaImageProcessor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    **config_overrides,
) -> tuple[EmmaForConditionalGeneration, EmmaProcessor]:
    """
    Build EMMA from a Qwen3 causal-LM checkpoint, a SigLIP2 (vision or full) checkpoint and a diffusers
    `AutoencoderDC` checkpoint (folders or Hub ids, as those libraries save them): shared weights copied, the `gen`
    stream initialised from `und`, the STEM expert from the versatile one, adapters and heads fresh with the velocity
    head's output at zero, and the tokenizer extended with EMMA's special tokens, whose rows start at the mean
    embedding. `config_overrides` go to [`EmmaConfig`] (e.g. `num_shallow_layers`, `vision_moe_layers`).

    The model is built on the meta device, checked against the checkpoints' headers, given memory once in `dtype`
    and filled tensor by tensor from the files, so memory holds the model and not a second copy of it.
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
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    headers = [
        {key: stored for file in safetensors_files(source, name) for key, stored in stored_tensors(file).items()}
        for source, name in ((llm, SAFE_WEIGHTS_NAME), (vision, SAFE_WEIGHTS_NAME), (vae, DIFFUSERS_WEIGHTS_NAME))
    ]
    weights = emma_weight_names(config, *headers)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as transformers builds in a dtype: buffers computed in float32 stay float32
    try:
        with torch.device("meta"):
            model = EmmaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    check_component_weights(model, weights)
    model.to_empty(device="cpu")
    model.tie_weights()
    load_component_weights(model, weights)
    # What the checkpoints did not fill (EMMA's own modules, non-persistent buffers) is initialised as
    # transformers initialises missing weights: `_init_weights` on every tensor not flagged as loaded.
    tensors = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers()])
    for module in [*model.modules(), *tensors.values()]:
        module._is_hf_initialized = False
    for key in weights:
        tensors[key]._is_hf_initialized = True  # after the loop above: a tied tensor is loaded under its other name
    model.initialize_weights()
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
