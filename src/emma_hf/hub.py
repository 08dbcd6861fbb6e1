"""
Hub folders: one checkpoint that `AutoModel`/`AutoProcessor` read (with or without `emma_hf` installed) and that
`EmmaPipeline` and diffusers' `DiffusionPipeline` read too, holding ONE copy of the weights; its model card; the
upload.

Layout written by [`export_checkpoint`]:

    config.json, generation_config.json     the model's config, `auto_map` naming the remote-code classes
    model.safetensors.index.json            maps every weight to its shard under `model/`
    *.py                                    the remote code: configuration, modeling, processing (flat, at the root,
                                            where transformers fetches code from) and the pipeline
    processor_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja
    README.md                               the model card, from `model_card.md`
    model_index.json                        diffusers' index of the pipeline's components
    .emma_export.json                       the files this export wrote: a later export replaces those, keeps others
    model/                                  config.json, generation_config.json and the safetensors shards (with
                                            their own index when sharded): the pipeline's `model` component
    processor/, scheduler/                  the pipeline's other components

With `remote_code=False` the folder is transformers' plain layout (weights at the root) plus `scheduler/`, without
code, `auto_map` or `model_index.json`: a checkpoint for the installed package, as the shipped shapes model is.
"""

import json
import os
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin
from huggingface_hub import HfApi, ModelCard, ModelCardData
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .modeling_emma import EmmaForConditionalGeneration
from .processing_emma import EmmaProcessor
from .sizes import parameter_report


MODEL_SUBFOLDER = "model"
PROCESSOR_SUBFOLDER = "processor"
SCHEDULER_SUBFOLDER = "scheduler"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
# Lists the files an export wrote: a later export replaces those and keeps everything else.
EXPORT_MANIFEST = ".emma_export.json"
# What exports from before the manifest wrote at the top level (either layout), recognised by name.
LEGACY_EXPORT_FILES = (
    "*.json",
    "*.safetensors",
    "*_emma.py",
    "chat_template.jinja",
    "README.md",
    MODEL_SUBFOLDER,
    PROCESSOR_SUBFOLDER,
    SCHEDULER_SUBFOLDER,
)
# Files where `save_pretrained` records remote-code classes (`auto_map`) for classes registered with auto classes.
AUTO_MAP_FILES = ("config.json", "processor_config.json", "tokenizer_config.json")
# Keywords of `upload_export`, which `push_to_hub` passes on.
UPLOAD_SETTINGS = ("private", "token", "revision", "commit_message", "create_pr")
# `save_pretrained` records the one auto class a model class is registered with; the Hub's remote code answers to
# every auto class of a multimodal generator (releases without one ignore its entry).
EXTRA_MODEL_AUTO_CLASSES = ("AutoModelForMultimodalLM", "AutoModelForCausalLM")
HUB_TAGS = ["emma", "any-to-any", "image-text-to-text", "text-to-image", "image-editing"]
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
    # The usage examples: a checkpoint with a narrow domain gives what it answers and draws.
    "example_question": "What is this?",
    "example_prompt": "a red circle above a blue square",
    "example_edit": "make the circle green",
}


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


def model_card(
    model: EmmaForConditionalGeneration, repo_id: str, *, remote_code: bool = True, **card_fields
) -> ModelCard:
    """
    The model card of an exported checkpoint (`model_card.md` filled in): Hub metadata, this model's sizes and
    configured design choices, and the texts in `card_fields` (`intended_use`, `training`, `limitations`; defaults in
    `CARD_DEFAULTS`) with `license`, `base_model` and `model_name` for the metadata. Its usage examples load the
    checkpoint's own code when `remote_code`, else the installed `emma_hf`.
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
        tags=[*HUB_TAGS, "custom_code"] if remote_code else HUB_TAGS,
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
        remote_code=remote_code,
        sampler=", ".join(f"`{name}={value}`" for name, value in (config.image_sampler_defaults or {}).items()),
        emma_hf_version=emma_hf_version,
        parameters=f"{parameter_report(model).total / 1e6:,.1f}M",
        decoder=f"Qwen3, {text.num_hidden_layers} layers, hidden {text.hidden_size} (the first "
        f"{config.num_shallow_layers} share all but {', '.join(config.shallow_decoupled_modules) or 'nothing'}; the "
        f"others all but {', '.join(config.deep_decoupled_modules) or 'nothing'})",
        vision=f"SigLIP2, {vision.num_hidden_layers} layers, patch {vision.patch_size}, MoE in layers "
        f"{config.vision_moe_layers}",
        vae=f"DC-AE, {config.vae_config['latent_channels']} latent channels, {config.image_grid_size}x downsampling",
        tokens_512=config.num_image_tokens(512, 512),
        num_layers=text.num_hidden_layers,
        num_shallow_layers=config.num_shallow_layers,
        shallow_decoupled_modules=config.shallow_decoupled_modules,
        deep_decoupled_modules=config.deep_decoupled_modules,
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
    scheduler: SchedulerMixin | None = None,
    remote_code: bool = True,
    repo_id: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **card_fields,
) -> Path:
    """
    Write `model` and `processor` as one Hub checkpoint folder (layout in this module's docstring) and return its
    path. `scheduler` is the pipeline's (default: flow-matching Euler with the model's shift settings);
    `remote_code=False` writes a folder for the installed `emma_hf` only. `card_fields` go into the model card:
    `license`, `base_model`, `model_name`, `intended_use`, `training`, `limitations` (see [`model_card`]).

    The export is written beside the folder and swapped in whole, so a failed export leaves the previous one as it
    was. An earlier EMMA export is replaced; files it did not write (a `.git`, notes) are kept. A non-empty folder
    that is not an EMMA export is refused unless `overwrite=True`, which replaces only the files the export writes.
    """
    if not isinstance(model, EmmaForConditionalGeneration):
        hint = (
            " (AutoModel gives the backbone; load with AutoModelForImageTextToText)"
            if type(model).__name__ == "EmmaModel"
            else ""
        )
        raise TypeError(f"model must be an EmmaForConditionalGeneration, got {type(model).__name__}{hint}")
    if not isinstance(processor, EmmaProcessor):
        raise TypeError(f"processor must be an EmmaProcessor, got {type(processor).__name__}")
    if scheduler is not None and not isinstance(scheduler, SchedulerMixin):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    previous_export = check_save_directory(save_directory, overwrite)
    save_directory = Path(save_directory)
    target = save_directory.resolve()
    sync_special_tokens(model, processor)
    card = model_card(model, repo_id or target.name, remote_code=remote_code, **card_fields)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(**model.config.flow_scheduler_config())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        if remote_code:
            write_model_files(model, staging, max_shard_size)
            processor.save_pretrained(staging)
            write_pipeline_files(processor, scheduler, staging)
        else:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            processor.save_pretrained(staging)
            scheduler.save_pretrained(staging / SCHEDULER_SUBFOLDER)
            remove_remote_code(staging)
        card.save(staging / "README.md")
        written = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        (staging / EXPORT_MANIFEST).write_text(json.dumps({"files": written}, indent=2) + "\n")
        swap_in(staging, target, owned={*previous_export, *written, EXPORT_MANIFEST})
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return save_directory


def check_save_directory(save_directory: str | os.PathLike, overwrite: bool = False) -> set[str]:
    """
    Check where [`export_checkpoint`] is to write (before any heavy work) and return the paths in it that an earlier
    export wrote, which the new one replaces. A non-empty folder that no export wrote is refused unless `overwrite`.
    Exports list their files in `EXPORT_MANIFEST`; a folder from before the manifest (or a plain `save_pretrained`
    of an EMMA model) is recognised by its config.
    """
    if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
        raise ValueError(f"save_directory must name a folder, got {save_directory!r}")
    folder = Path(save_directory).resolve()
    if folder.is_file():
        raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder")
    if folder in (Path.cwd(), *Path.cwd().parents):
        raise ValueError(
            f"save_directory {str(save_directory)!r} is the working folder or holds it; export into a subfolder"
        )
    if not folder.is_dir() or not any(folder.iterdir()):
        return set()
    manifest = folder / EXPORT_MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
                raise TypeError(files)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{str(manifest)!r}, the list of files an earlier export wrote, is damaged ({error!r}); delete it "
                "and pass overwrite=True to export over the folder"
            ) from error
        return set(files)
    config = folder / "config.json"
    try:
        is_emma = config.is_file() and json.loads(config.read_text()).get("model_type") == "emma"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        is_emma = False
    if is_emma:
        return {entry.name for entry in folder.iterdir() if any(entry.match(name) for name in LEGACY_EXPORT_FILES)}
    if not overwrite:
        found = sorted(entry.name for entry in folder.iterdir())
        raise ValueError(
            f"save_directory {str(save_directory)!r} is not empty ({found[:5]}{' ...' if len(found) > 5 else ''}) "
            "and holds no EMMA export; pass overwrite=True (emma-hf: --overwrite) to write into it (files at the "
            "paths the export writes are replaced, others kept), or export into a new folder"
        )
    return set()


def swap_in(staging: Path, target: Path, owned: set[str]) -> None:
    """
    Put the finished export `staging` in place of `target`, moving over what `target` holds that no export wrote
    (`owned`: paths relative to the folder). Renames only: on failure `target` is put back as it was.
    """
    if not target.exists():
        staging.chmod(0o755)  # mkdtemp's private mode would stay on the renamed folder
        staging.rename(target)
        return
    staging.chmod(target.stat().st_mode & 0o7777)
    kept = entries_not_owned(target, target, owned)
    collisions = [str(entry) for entry in kept if (staging / entry.relative_to(target)).exists()]
    if collisions:
        raise ValueError(
            f"{collisions} stand where the export writes (a file or link where it writes a folder, or the reverse); "
            "move them away and export again"
        )
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    previous.rmdir()
    target.rename(previous)
    moved = []
    try:
        for entry in kept:
            source, destination = previous / entry.relative_to(target), staging / entry.relative_to(target)
            destination.parent.mkdir(parents=True, exist_ok=True)
            source.rename(destination)
            moved.append((source, destination))
        staging.rename(target)
    except BaseException:
        for source, destination in reversed(moved):
            destination.rename(source)
        previous.rename(target)
        raise
    shutil.rmtree(previous)


def entries_not_owned(folder: Path, root: Path, owned: set[str]) -> list[Path]:
    """The entries under `folder` that are neither in `owned` nor real folders holding something in it."""
    entries = []
    for entry in folder.iterdir():
        path = entry.relative_to(root).as_posix()
        if path in owned:
            continue
        if entry.is_dir() and not entry.is_symlink() and any(name.startswith(f"{path}/") for name in owned):
            entries += entries_not_owned(entry, root, owned)
        else:
            entries.append(entry)
    return entries


def write_model_files(model: EmmaForConditionalGeneration, save_directory: Path, max_shard_size: int | str) -> None:
    """The weights under `model/`, its configs both there and at the root, and the remote code at the root."""
    model_directory = save_directory / MODEL_SUBFOLDER
    # `save_pretrained` adds the registered auto class to the config's `auto_map` and writes it with these.
    model_class = f"{type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"
    model.config.auto_map = {**(model.config.auto_map or {}), **dict.fromkeys(EXTRA_MODEL_AUTO_CLASSES, model_class)}
    model.save_pretrained(model_directory, max_shard_size=max_shard_size)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(model_directory / name, save_directory / name)
    for code_file in model_directory.glob("*.py"):
        shutil.move(code_file, save_directory / code_file.name)
    write_root_index(model_directory, save_directory)


def remove_remote_code(folder: Path) -> None:
    """Drop what `save_pretrained` writes for classes registered with auto classes: code files and `auto_map`."""
    for code_file in folder.glob("*.py"):
        code_file.unlink()
    for name in AUTO_MAP_FILES:
        path = folder / name
        if path.is_file():
            content = json.loads(path.read_text())
            path.write_text(json.dumps(without_auto_map(content), indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def without_auto_map(content: dict) -> dict:
    """A saved config without `auto_map` at any depth (a processor nests its image processor's config)."""
    return {
        key: without_auto_map(value) if isinstance(value, dict) else value
        for key, value in content.items()
        if key != "auto_map"
    }


def self_contained_source(module_file: Path) -> str:
    """A remote-code module with `configuration_emma` inlined: diffusers fetches a component's file alone."""
    source = module_file.read_text()
    relative_import = re.search(r"^from \.configuration_emma import .+\n", source, flags=re.MULTILINE)
    if relative_import is None:
        raise RuntimeError(
            f"{module_file.name} no longer imports from configuration_emma as expected; update the export"
        )
    configuration = (module_file.parent / "configuration_emma.py").read_text()
    return configuration + "\n\n" + source.replace(relative_import.group(0), "")


def write_pipeline_files(processor: EmmaProcessor, scheduler: SchedulerMixin, save_directory: Path) -> None:
    """What diffusers needs on top of the transformers files: `model_index.json`, the pipeline code, the scheduler,
    the processor in its own folder, and each custom component's code, self-contained, in its subfolder."""
    package = Path(__file__).parent
    shutil.copyfile(package / "pipeline_emma.py", save_directory / "pipeline_emma.py")
    (save_directory / MODEL_SUBFOLDER / "modeling_emma.py").write_text(
        self_contained_source(package / "modeling_emma.py")
    )
    processor_directory = save_directory / PROCESSOR_SUBFOLDER
    processor.save_pretrained(processor_directory)
    (processor_directory / "configuration_emma.py").unlink(missing_ok=True)
    (processor_directory / "processing_emma.py").write_text(self_contained_source(package / "processing_emma.py"))
    scheduler.save_pretrained(save_directory / SCHEDULER_SUBFOLDER)
    model_index = {
        "_class_name": ["pipeline_emma", "EmmaPipeline"],
        "_diffusers_version": diffusers.__version__,
        MODEL_SUBFOLDER: ["modeling_emma", "EmmaForConditionalGeneration"],
        PROCESSOR_SUBFOLDER: ["processing_emma", "EmmaProcessor"],
        SCHEDULER_SUBFOLDER: ["diffusers", type(scheduler).__name__],
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
    scheduler: SchedulerMixin | None = None,
    max_shard_size: int | str = "5GB",
    **fields,
):
    """
    Export to a temporary folder and upload it with huggingface_hub's `create_repo` + `upload_folder`. The keywords
    of [`upload_export`] (`private`, `token`, `revision`, `commit_message`, `create_pr`) go to the upload, the others
    into the model card (see [`export_checkpoint`]).
    """
    upload = {name: fields.pop(name) for name in UPLOAD_SETTINGS if name in fields}
    with tempfile.TemporaryDirectory() as folder:
        export_checkpoint(
            model, processor, folder, scheduler=scheduler, repo_id=repo_id, max_shard_size=max_shard_size, **fields
        )
        return upload_export(folder, repo_id, **upload)


def upload_export(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload EMMA checkpoint",
    create_pr: bool = False,
):
    """Upload an exported folder to `repo_id`, creating the repository if needed."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, create_pr=create_pr
    )
