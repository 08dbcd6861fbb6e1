# Copyright 2026 The emma_hf authors. Licensed under the Apache License, Version 2.0.
"""
EmmaPipeline: text-to-image and instruction editing with EMMA, as a diffusers pipeline around the very
`EmmaForConditionalGeneration` object that chats.

The prompt (and, for an edit, the source image) is encoded once into a KV cache; every denoising step then runs only
the generated image's tokens against it. Classifier-free guidance batches its conditions into that one forward.
This file imports no sibling module, so it loads as diffusers remote code next to the model's own files.
"""

import contextlib
import functools
import importlib
import inspect
import math
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from emma_hf import EmmaPipeline, shipped_model_path

        >>> pipe = EmmaPipeline.from_pretrained(shipped_model_path())
        >>> image = pipe("a red circle at the top left", generator=torch.Generator().manual_seed(0)).images[0]
        >>> edited = pipe("make the red circle green", image=image, generator=torch.Generator().manual_seed(0)).images[0]
        ```
"""
# A character no tokenizer can encode (half of a UTF-16 pair, as broken JSON or Windows paths produce).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# `save_pretrained(..., push_to_hub=True)` settings, as diffusers names them.
HUB_UPLOAD_KEYWORDS = ("repo_id", "commit_message", "private", "token", "create_pr")
# Sampler settings for checkpoints whose config names none (`EmmaConfig.image_sampler_defaults` overrides them).
SAMPLER_DEFAULTS = {"num_inference_steps": 30, "guidance_scale": 4.0, "image_guidance_scale": 2.0}


@dataclass
class EmmaPipelineOutput(BaseOutput):
    """
    images: a list of PIL images (`"pil"`), a `(batch, H, W, 3)` array in [0, 1] (`"np"`), a `(batch, 3, H, W)`
        tensor in [0, 1] (`"pt"`), or the scaled DC-AE latents `(batch, C, H/32, W/32)` (`"latent"`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def apply_guidance(
    full: torch.Tensor,
    no_text: torch.Tensor | None,
    no_image: torch.Tensor | None,
    guidance_scale: float,
    image_guidance_scale: float,
    guidance_renorm_min: float | None,
) -> torch.Tensor:
    """
    Classifier-free guidance over up to three conditions: text guidance `v = v_no_text + s (v_full - v_no_text)`,
    then image guidance `v = v_no_image + s_img (v - v_no_image)`; with `guidance_renorm_min`, each sample's guided
    velocity is scaled back towards the norm of `v_full` (by a factor in `[guidance_renorm_min, 1]`).
    """
    guided = full
    if no_text is not None:
        guided = no_text + guidance_scale * (guided - no_text)
    if no_image is not None:
        guided = no_image + image_guidance_scale * (guided - no_image)
    if guidance_renorm_min is not None:
        scale = full.flatten(1).norm(dim=1) / (guided.flatten(1).norm(dim=1) + 1e-8)
        guided = guided * scale.clamp(min=guidance_renorm_min, max=1.0)[:, None, None, None]
    return guided


def retrieve_timesteps(
    scheduler,
    num_inference_steps: int | None = None,
    device: str | torch.device | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, int]:
    """
    diffusers' helper of this name: `scheduler.set_timesteps` with custom `timesteps` or `sigmas`, then the
    scheduler's timesteps and their count. Keyword arguments
    the scheduler's `set_timesteps` does not take (`mu` for a scheduler without dynamic shifting) are left out.
    `check_custom_schedule` (run by `check_inputs`) has refused a custom schedule the scheduler cannot take.
    """
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    if timesteps is not None:
        schedule = {"timesteps": timesteps}
    elif sigmas is not None:
        schedule = {"sigmas": sigmas}
    else:
        schedule = {"num_inference_steps": num_inference_steps}
    extra = {name: value for name, value in kwargs.items() if name in accepted and value is not None}
    scheduler.set_timesteps(device=device, **schedule, **extra)
    return scheduler.timesteps, len(scheduler.timesteps)


def check_custom_schedule(scheduler, timesteps: list[int] | None, sigmas: list[float] | None) -> None:
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None and name not in accepted:
            raise ValueError(
                f"{type(scheduler).__name__} does not take custom `{name}`; pass `num_inference_steps`, or use "
                "FlowMatchEulerDiscreteScheduler"
            )


def check_scheduler(scheduler, compatibles: tuple[str, ...]) -> None:
    """A scheduler the pipeline can drive: flow matching, with the velocity `noise - x0` EMMA predicts."""
    name = type(scheduler).__name__
    if name not in compatibles:
        raise ValueError(
            f"EmmaPipeline cannot run {name}: it needs a flow-matching scheduler, one of {list(compatibles)}"
        )
    config = scheduler.config
    if config.get("prediction_type", "flow_prediction") != "flow_prediction" or config.get("use_flow_sigmas") is False:
        raise ValueError(
            f"{name} must predict flow: build it with `{name}.from_config(pipe.scheduler.config, "
            'prediction_type="flow_prediction", use_flow_sigmas=True)`'
        )


def as_python_number(value):
    """A numpy scalar (`np.int64(512)`, `np.float32(4.0)`) as the Python number it holds; anything else as given."""
    return value.item() if isinstance(value, np.generic) else value


def unit_range(image):
    """A float tensor or array in [-1, 1] (diffusers' other convention, told apart by a negative value) in [0, 1]."""
    is_float = (isinstance(image, torch.Tensor) and image.is_floating_point()) or (
        isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)
    )
    if is_float and -1 <= image.min() < 0 and image.max() <= 1:
        return (image + 1) / 2
    return image


def source_images(image):
    """
    The `image` argument as diffusers' `VaeImageProcessor` reads it: a 4-D batch (tensor `(N, C, H, W)`, array
    `(N, H, W, C)`) becomes the list of its images (one for every prompt; a batch of one stays one image), and float
    images in [-1, 1] are mapped to [0, 1]. PIL images, paths and lists pass as given.
    """
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
        images = [unit_range(item) for item in image]
        return images[0] if len(images) == 1 else images
    if isinstance(image, (list, tuple)):
        return [unit_range(item) for item in image]
    return unit_range(image) if image is not None else None


def lora_scale_of(attention_kwargs: dict | None) -> float:
    """The per-call LoRA scale of `attention_kwargs` (diffusers' `{"scale": ...}`); EMMA takes no other key."""
    if attention_kwargs is None:
        return 1.0
    if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
        raise ValueError(f"attention_kwargs may only hold 'scale' (the LoRA scale), got {attention_kwargs!r}")
    scale = as_python_number(attention_kwargs.get("scale", 1.0))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"attention_kwargs['scale'] must be a finite number, got {scale!r}")
    return float(scale)


def lora_config_from_state_dict(state_dict: dict[str, torch.Tensor]):
    """A `LoraConfig` for bare LoRA weights: the modules and ranks they hold, `lora_alpha = r` (scale 1)."""
    from peft import LoraConfig

    ranks = {key.split(".lora_A")[0]: tensor.shape[0] for key, tensor in state_dict.items() if ".lora_A" in key}
    if not ranks:
        raise ValueError("the state dict holds no LoRA weights (no `lora_A` keys)")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={name: r for name, r in ranks.items() if r != rank},
        alpha_pattern={name: r for name, r in ranks.items() if r != rank},
    )


def adapter_weights(source: str | os.PathLike, weight_name: str, **download) -> dict[str, torch.Tensor]:
    """The LoRA weights file `weight_name` of a local folder or a Hub repository."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    local = os.path.join(source, download.get("subfolder") or "", weight_name)
    if os.path.isdir(source):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"no LoRA weights file {weight_name!r} in {os.fspath(source)!r}")
        return load_file(local)
    return load_file(hf_hub_download(os.fspath(source), weight_name, **download))


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_components(model, processor) -> None:
    """The model and processor must be EMMA's, and agree on the special tokens' ids (an export syncs them)."""
    if not hasattr(model, "predict_velocity"):
        raise TypeError(f"model must be an EmmaForConditionalGeneration, got {type(model).__name__}")
    if not hasattr(processor, "emma_token_ids"):
        raise TypeError(f"processor must be an EmmaProcessor, got {type(processor).__name__}")
    disagreeing = {
        field: (token_id, getattr(model.config, field))
        for field, token_id in processor.emma_token_ids.items()
        if getattr(model.config, field) != token_id
    }
    if disagreeing:
        raise ValueError(
            "the processor's tokenizer and the model config give EMMA's special tokens different ids "
            f"(field: (tokenizer id, config id)) {disagreeing}; load both from one exported checkpoint, or call "
            "emma_hf.hub.sync_special_tokens(model, processor) first"
        )


# One lock per pipeline, kept outside the instance so that pipelines still copy and pickle.
CALL_LOCKS: "weakref.WeakKeyDictionary[DiffusionPipeline, threading.Lock]" = weakref.WeakKeyDictionary()
CALL_LOCKS_GUARD = threading.Lock()
RUNNING_IN_THIS_THREAD = threading.local()


def one_call_at_a_time(call: Callable) -> Callable:
    """
    Run a pipeline's calls one after another: a call keeps its state on the pipeline (guidance scales, the
    scheduler's timesteps and step index), as diffusers' pipelines and callbacks expect, so a call from another
    thread waits for the running one instead of corrupting it. Calling the pipeline from inside its own call (a
    callback) is refused.
    """

    @functools.wraps(call)
    def serialised(pipeline, *args, **kwargs):
        running = RUNNING_IN_THIS_THREAD.__dict__.setdefault("pipelines", set())
        if id(pipeline) in running:
            raise RuntimeError(
                f"{type(pipeline).__name__} was called from inside its own call (from a callback?); a call's state "
                "lives on the pipeline, so build a second pipeline with from_model(pipe.model, pipe.processor)"
            )
        with CALL_LOCKS_GUARD:
            lock = CALL_LOCKS.setdefault(pipeline, threading.Lock())
        with lock:
            running.add(id(pipeline))
            try:
                return call(pipeline, *args, **kwargs)
            finally:
                running.discard(id(pipeline))

    return serialised


class EmmaPipeline(DiffusionPipeline):
    r"""
    Text-to-image (`image=None`) and instruction editing (`image=...`) with EMMA.

    Components:
        model ([`EmmaForConditionalGeneration`]): the unified model; its frozen DC-AE decodes the latents.
        processor ([`EmmaProcessor`]): writes the prompt as a chat turn and prepares the source image.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): flow-matching Euler steps; by default with the model's shift.

    Build it around a chat model with [`from_model`] (no copy of any weight), or load an exported folder with
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

    Threads: a call keeps its state on the pipeline (as diffusers' callbacks expect), so calls from several threads
    run one after another; for parallel calls give each thread its own `from_model(pipe.model, pipe.processor)`,
    which shares the weights.

    LoRA: adapters trained with PEFT on the model load with [`load_lora_weights`], which hands them to the model's
    transformers PEFT integration (`model.load_adapter`). diffusers' own LoRA loaders convert and inject weights
    into diffusers models only, while this pipeline's denoiser is a transformers model; the same adapter folder
    therefore serves chat (`model.load_adapter`) and drawing alike.
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["latents"]
    # The schedulers that integrate EMMA's velocity (the DPM-Solver, UniPC and DEIS families with
    # `prediction_type="flow_prediction", use_flow_sigmas=True`).
    _compatibles = (
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "FlowMatchLCMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    )

    def __init__(self, model, processor, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        check_components(model, processor)
        self.register_modules(model=model, processor=processor, scheduler=scheduler)
        self.vae_scale_factor = model.config.image_grid_size
        self.vae_image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_model(cls, model, processor, scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> "EmmaPipeline":
        """A pipeline around an existing model and processor: parameters are shared, not copied."""
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(**model.config.flow_scheduler_config())
        return cls(model=model, processor=processor, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> "EmmaPipeline":
        """
        Load an exported EMMA folder or Hub id, or a folder of `model.save_pretrained` (a Trainer checkpoint), whose
        scheduler is then the one an export would write. With `trust_remote_code=True` this is diffusers' loader (the
        checkpoint's own code); otherwise, or for a local folder without code (no `model_index.json`, such as the
        shipped model), the components load through the transformers Auto classes, which needs `emma_hf` installed.
        Keyword arguments go to every component (e.g. `revision`, `cache_dir`) and to the model (e.g. `dtype`,
        `device_map`, `quantization_config`); as in diffusers, `model=`, `processor=` or `scheduler=` pass a component
        that is used as given instead of loaded.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if (os.path.isabs(source) or source.startswith(".") or source.count("/") > 1) and not os.path.isdir(source):
            raise OSError(f"no folder {source!r}; pass an exported EMMA folder or a Hub model id ('namespace/name')")
        without_code = os.path.isdir(source) and not os.path.isfile(os.path.join(source, "model_index.json"))
        if kwargs.pop("trust_remote_code", False) and not without_code:
            return super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        variant = kwargs.pop("variant", None)
        if variant is not None:
            raise ValueError(f"variant={variant!r} is not supported: an EMMA export holds one set of weights")
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        if isinstance(dtype, dict):
            # diffusers' per-component form; the model is the only component with weights.
            unknown = set(dtype) - {"model", "default"}
            if unknown:
                raise ValueError(f"dtype as a dict may name 'model' and 'default', got {sorted(unknown)}")
            dtype = dtype.get("model", dtype.get("default"))
        if dtype is not None:
            kwargs["dtype"] = dtype
        given = {name: kwargs.pop(name) for name in ("model", "processor", "scheduler") if name in kwargs}
        shared = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        model = given.get("model") or AutoModelForImageTextToText.from_pretrained(
            pretrained_model_name_or_path, **kwargs
        )
        processor = given.get("processor") or AutoProcessor.from_pretrained(pretrained_model_name_or_path, **shared)
        scheduler = given.get("scheduler")
        if scheduler is None and without_code and not os.path.isdir(os.path.join(source, "scheduler")):
            # A folder of `model.save_pretrained` or a Trainer checkpoint: the scheduler an export would write.
            scheduler = FlowMatchEulerDiscreteScheduler(**model.config.flow_scheduler_config())
        elif scheduler is None:
            settings = FlowMatchEulerDiscreteScheduler.load_config(
                pretrained_model_name_or_path, subfolder="scheduler", **shared
            )
            class_name = settings.get("_class_name", FlowMatchEulerDiscreteScheduler.__name__)
            if class_name not in cls._compatibles:
                raise ValueError(
                    f"{source!r}: its scheduler {class_name} is not one EmmaPipeline runs ({list(cls._compatibles)})"
                )
            scheduler = getattr(diffusers, class_name).from_config(settings)
        return cls(model=model, processor=processor, scheduler=scheduler)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """
        Write the exported layout that `AutoModel`, `AutoProcessor` and this pipeline all read, with one copy of
        the weights and this pipeline's scheduler, its class and settings kept (`emma_hf.hub.export_checkpoint`;
        needs `emma_hf` installed).

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            safe_serialization (`bool`, defaults to `True`): EMMA writes safetensors only; `False` is refused.
            variant (`str`, *optional*): not supported (one set of weights per export); pass `None`.
            max_shard_size (`int` or `str`, *optional*): the largest weight shard, e.g. `"5GB"` (the default).
            push_to_hub (`bool`, defaults to `False`): then upload the folder to `repo_id` (default: the folder's
                name), with `commit_message`, `private`, `token` and `create_pr` as in diffusers.
            kwargs: those upload settings, `overwrite=True` to write into a non-empty folder that holds no EMMA
                export, and the model card's fields (`license`, `intended_use`, ...).
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False is not supported: EMMA checkpoints are safetensors only")
        if variant is not None:
            raise ValueError(f"variant={variant!r} is not supported: an EMMA export holds one set of weights")
        upload = {name: kwargs.pop(name) for name in HUB_UPLOAD_KEYWORDS if name in kwargs}
        if upload and not push_to_hub:
            raise ValueError(f"{sorted(upload)} are upload settings: pass them with push_to_hub=True")
        try:
            # Imported by name: remote-code loaders scan import statements and would warn where emma_hf is missing.
            hub = importlib.import_module("emma_hf.hub")
        except ImportError as error:
            raise ImportError(
                "EmmaPipeline.save_pretrained writes EMMA's export layout: `pip install emma_hf`"
            ) from error
        shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        repo_id = upload.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
        card = {"repo_id": repo_id, **kwargs} if push_to_hub else kwargs
        hub.export_checkpoint(self.model, self.processor, save_directory, scheduler=self.scheduler, **shards, **card)
        if push_to_hub:
            hub.upload_export(save_directory, repo_id, **upload)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def image_guidance_scale(self) -> float:
        return self._image_guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call guides by text or by the source image (more than one condition per step)."""
        return self._do_text_guidance or self._do_image_guidance

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep being denoised, inside a call (for callbacks); None outside one."""
        return self._current_timestep

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        lora_config=None,
        **kwargs,
    ) -> None:
        """
        Load a PEFT LoRA adapter into the model, as diffusers' `load_lora_weights` does: from a folder or Hub id (the
        folder of `PeftModel.save_pretrained` or `emma-hf train`; `weight_name` picks another weights file in it), or
        from a state dict (its `lora_config`, a `peft.LoraConfig`, or one inferred from the ranks with
        `lora_alpha = r`). Unnamed adapters are called `default_0`, `default_1`, ...; the adapter loaded last is the
        active one. Keyword arguments go to the download (`revision`, `token`, `subfolder`, ...).
        """
        from peft import LoraConfig

        names = self.get_list_adapters().get("model", [])
        adapter_name = adapter_name or f"default_{len(names)}"
        if adapter_name in names:
            raise ValueError(f"an adapter named {adapter_name!r} is loaded already; pass another adapter_name")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            state_dict = source
        else:
            lora_config = lora_config or LoraConfig.from_pretrained(source, **kwargs)
            state_dict = adapter_weights(source, weight_name or "adapter_model.safetensors", **kwargs)
        # `PeftModel.save_pretrained` names keys from the PeftModel wrapper; the adapter goes into the bare model.
        state_dict = {key.removeprefix("base_model.model."): value for key, value in state_dict.items()}
        config = lora_config or lora_config_from_state_dict(state_dict)
        # peft's own functions: transformers >= 5.24 refuses its adapter methods below peft 0.22.
        from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

        with warnings.catch_warnings():
            # Several adapters in one model are what this method is for.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            inject_adapter_in_model(config, self.model, adapter_name=adapter_name)
        result = set_peft_model_state_dict(self.model, state_dict, adapter_name=adapter_name)
        missing = [key for key in result.missing_keys if f".{adapter_name}." in key and "lora_" in key]
        if missing:
            self.delete_adapters(adapter_name)
            raise ValueError(f"the LoRA weights lack {len(missing)} tensors the adapter needs, e.g. {missing[:3]}")
        self.model.eval()
        self.set_adapters(adapter_name)

    @contextlib.contextmanager
    def scaled_lora(self, scale: float):
        """The active LoRA adapters scaled by `scale` inside the block (diffusers' per-call LoRA scale)."""
        from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

        scale_lora_layers(self.model, scale)
        try:
            yield
        finally:
            unscale_lora_layers(self.model, scale)

    def lora_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in self.model.modules() if isinstance(module, BaseTunerLayer)]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The adapters loaded in each component (`{"model": [...]}`), as diffusers lists them."""
        layers = self.lora_layers()
        names = list(dict.fromkeys(name for layer in layers for name in layer.lora_A)) if layers else []
        return {"model": names} if names else {}

    def get_active_adapters(self) -> list[str]:
        layers = self.lora_layers()
        return list(layers[0].active_adapters) if layers else []

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Activate `adapter_names` together, each scaled by its weight (default 1.0), as in diffusers."""
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self.get_list_adapters().get("model", [])
        unknown = [name for name in names if name not in loaded]
        if unknown or not names:
            raise ValueError(f"adapter_names must name loaded adapters {loaded}, got {adapter_names!r}")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights must hold one weight per adapter ({len(names)}), got {len(weights)}")
        weights = [1.0 if weight is None else weight for weight in weights]
        set_weights_and_activate_adapters(self.model, names, weights)

    def enable_lora(self) -> None:
        from diffusers.utils.peft_utils import set_adapter_layers

        set_adapter_layers(self.model, enabled=True)

    def disable_lora(self) -> None:
        """Draw with the base model; the adapters stay loaded (`enable_lora` turns them back on)."""
        from diffusers.utils.peft_utils import set_adapter_layers

        set_adapter_layers(self.model, enabled=False)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            delete_adapter_layers(self.model, name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter and the LoRA layers themselves: the model is the base model again."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self.model._hf_peft_config_loaded = False

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None, safe_fusing: bool = False):
        """Merge the active (or the named) adapters into the base weights, scaled by `lora_scale`."""
        for layer in self.lora_layers():
            layer.scale_layer(lora_scale)
            layer.merge(safe_merge=safe_fusing, adapter_names=adapter_names)
        self._lora_fuse_scale = lora_scale

    def unfuse_lora(self) -> None:
        """Take the fused adapters back out of the base weights (exact up to float rounding)."""
        scale = getattr(self, "_lora_fuse_scale", 1.0)
        for layer in self.lora_layers():
            layer.unmerge()
            layer.unscale_layer(scale)
        self._lora_fuse_scale = 1.0

    def sampler_setting(self, name: str, value):
        """`value`, or where it is None the checkpoint's setting, or the pipeline's own default."""
        if value is not None:
            return value
        return (getattr(self.model.config, "image_sampler_defaults", None) or {}).get(name, SAMPLER_DEFAULTS[name])

    def default_size(self) -> tuple[int, int]:
        """Text-to-image size when none is given: the largest square within the processor's pixel budget."""
        size = self.processor.image_processor.size
        if size.height is not None:
            return size.height, size.width
        side = max(1, math.isqrt(size.max_pixels) // self.vae_scale_factor) * self.vae_scale_factor
        return side, side

    def dynamic_shift(self, image_seq_len: int) -> float:
        """
        The timestep shift `exp(mu)` for an image of `image_seq_len` tokens: linear in the length between the
        scheduler's (`base_shift`, `max_shift`) at (`base_image_seq_len`, `max_image_seq_len`), or the model's
        settings for a scheduler that names none (the DPM-Solver family).
        """
        settings = self.scheduler.config
        names = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        if any(settings.get(name) is None for name in names):
            return self.model.config.flow_shift_for(image_seq_len)
        slope = (settings["max_shift"] - settings["base_shift"]) / (
            settings["max_image_seq_len"] - settings["base_image_seq_len"]
        )
        return math.exp(settings["base_shift"] + slope * (image_seq_len - settings["base_image_seq_len"]))

    def check_inputs(
        self,
        prompt,
        image,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        guidance_scale,
        image_guidance_scale,
        guidance_interval,
        guidance_renorm_min,
        num_images_per_prompt,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
        generator=None,
    ) -> None:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        if negative_prompt is not None:
            if isinstance(negative_prompt, (list, tuple)):
                if len(negative_prompt) != len(prompts) or not all(isinstance(p, str) for p in negative_prompt):
                    raise ValueError(
                        f"`negative_prompt` as a list must hold one string per prompt ({len(prompts)}), "
                        f"got {len(negative_prompt)} items"
                    )
            elif not isinstance(negative_prompt, str):
                raise TypeError(
                    f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}"
                )
        negative_prompts = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt or []
        for name, texts in (("prompt", prompts), ("negative_prompt", negative_prompts)):
            if any(LONE_SURROGATE.search(text) for text in texts):
                raise ValueError(f"`{name}` holds a lone UTF-16 surrogate, which is not valid Unicode text")
            found = sorted({token for text in texts for token in self.processor.control_tokens_in(text)})
            if found:
                raise ValueError(
                    f"`{name}` holds {found}, special tokens of EMMA's chat format: in a prompt they would forge chat "
                    "turns or image slots; remove them"
                )
        if isinstance(image, (list, tuple)) and len(image) != len(prompts):
            raise ValueError(
                f"`image` as a list must hold one source image per prompt ({len(prompts)}), got {len(image)}"
            )
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor):
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {value!r}")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of `timesteps` or `sigmas`")
        check_scheduler(self.scheduler, self._compatibles)
        check_custom_schedule(self.scheduler, timesteps, sigmas)
        highest = self.scheduler.config.num_train_timesteps
        for name, schedule, top in (("timesteps", timesteps, highest), ("sigmas", sigmas, 1.0)):
            if schedule is None:
                continue
            values = schedule.tolist() if isinstance(schedule, (torch.Tensor, np.ndarray)) else schedule
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"`{name}` must be a non-empty list of numbers, got {schedule!r}")
            numbers = [as_python_number(value) for value in values]
            if not all(is_finite_number(v) and 0 <= v <= top for v in numbers):
                raise ValueError(f"`{name}` must hold finite numbers in [0, {top}], got {list(numbers)}")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators) or generators == []:
            raise TypeError(
                f"`generator` must be a torch.Generator, a list of them (one per image) or None, got {generator!r}"
            )
        if (
            timesteps is None
            and sigmas is None
            and (
                not isinstance(num_inference_steps, int)
                or isinstance(num_inference_steps, bool)
                or num_inference_steps < 1
            )
        ):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
        for name, value in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            if not is_finite_number(value) or value < 0:
                raise ValueError(
                    f"`{name}` must be a finite number >= 0 (<= 1 switches that guidance off), got {value!r}"
                )
        if guidance_interval is not None and not (
            isinstance(guidance_interval, (list, tuple))
            and len(guidance_interval) == 2
            and all(is_finite_number(bound) for bound in guidance_interval)
            and 0 <= guidance_interval[0] < guidance_interval[1] <= 1
        ):
            raise ValueError(
                f"`guidance_interval` must be (low, high) with 0 <= low < high <= 1 in noise level t, got {guidance_interval!r}"
            )
        if guidance_renorm_min is not None and not (
            is_finite_number(guidance_renorm_min) and 0 <= guidance_renorm_min <= 1
        ):
            raise ValueError(f"`guidance_renorm_min` must be in [0, 1] or None, got {guidance_renorm_min!r}")
        if (
            not isinstance(num_images_per_prompt, int)
            or isinstance(num_images_per_prompt, bool)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}")
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
                raise ValueError("`latents` must be a (batch, channels, height / 32, width / 32) tensor")
            if not latents.is_floating_point():
                raise TypeError(f"`latents` must be a floating-point tensor, got {latents.dtype}")
            if latents.device.type == "meta":
                raise ValueError("`latents` must hold values: got a tensor on the meta device")
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` must be finite (no NaN or inf)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback_on_step_end_tensor_inputs is not None and not set(callback_on_step_end_tensor_inputs) <= set(
            self._callback_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}"
            )

    def encode_prompt(
        self,
        prompts: list[str],
        images: list[PIL.Image.Image] | None,
        negative_prompts: list[str],
        do_text_guidance: bool,
        do_image_guidance: bool,
        num_images_per_prompt: int = 1,
    ):
        """
        Encode every condition once into one left-padded KV cache, then lay its rows out as the denoising batch:
        `[full | no text | no image]`, each `len(prompts) * num_images_per_prompt` rows. Returns the context and the
        number of conditions.
        """
        texts = [self.processor.generation_prompt(p, images is not None) for p in prompts]
        condition_images = list(images) if images is not None else []
        if do_text_guidance:
            texts += [self.processor.generation_prompt(p, images is not None) for p in negative_prompts]
            condition_images += list(images) if images is not None else []
        if do_image_guidance:
            texts += [self.processor.generation_prompt(p, False) for p in prompts]
        inputs = self.processor(text=texts, images=condition_images or None, return_tensors="pt")
        device = self._execution_device
        context = self.model.encode_context(
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            pixel_values=inputs.get("pixel_values"),
            vae_pixel_values=inputs.get("vae_pixel_values"),
            image_grid_hw=inputs.get("image_grid_hw"),
        )
        num_conditions = len(texts) // len(prompts)
        rows = [
            condition * len(prompts) + index
            for condition in range(num_conditions)
            for index in range(len(prompts))
            for _ in range(num_images_per_prompt)
        ]
        return context.select(rows), num_conditions

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` must have shape {shape} for this batch and size, got {tuple(latents.shape)}"
                )
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` as a list must hold one generator per image ({batch_size}), got {len(generator)}"
            )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    @staticmethod
    def latents_from_callback(outputs, latents: torch.Tensor) -> torch.Tensor:
        """The latents a `callback_on_step_end` returned (its dict may leave them out), checked like `latents`."""
        if not isinstance(outputs, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict (the callback_kwargs it got), got {type(outputs).__name__}"
            )
        returned = outputs.pop("latents", latents)
        if (
            not isinstance(returned, torch.Tensor)
            or returned.shape != latents.shape
            or not returned.is_floating_point()
        ):
            raise ValueError(
                f"callback_on_step_end must return latents of shape {tuple(latents.shape)} and a floating dtype, "
                f"got {getattr(returned, 'shape', type(returned).__name__)}"
            )
        return returned

    def predict_guided_velocity(
        self, latents: torch.Tensor, t: torch.Tensor, context, num_conditions: int, guided: bool
    ) -> torch.Tensor:
        """One batched forward over every active condition, combined by [`apply_guidance`]."""
        batch = latents.shape[0]
        if not guided or num_conditions == 1:
            return self.model.predict_velocity(latents, t, context).float()
        velocity = self.model.predict_velocity(latents.repeat(num_conditions, 1, 1, 1), t, context).float()
        full, *others = velocity.split(batch)
        no_text = others.pop(0) if self._do_text_guidance else None
        no_image = others.pop(0) if self._do_image_guidance else None
        return apply_guidance(
            full, no_text, no_image, self._guidance_scale, self._image_guidance_scale, self._guidance_renorm_min
        )

    @torch.no_grad()
    @one_call_at_a_time
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        image: Any = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_renorm_min: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        attention_kwargs: dict[str, Any] | None = None,
    ) -> EmmaPipelineOutput | tuple:
        r"""
        Draw (`image=None`) or edit (`image` given) one image per prompt and per `num_images_per_prompt`.

        Args:
            prompt (`str` or `list[str]`):
                What to draw, or the edit instruction.
            image (`PIL.Image.Image`, `str`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                The source image of an edit: a PIL image, a path or URL, an `(H, W, C)` array or `(C, H, W)` tensor
                in [0, 1] or [-1, 1]; one for every prompt, or a list or 4-D batch with one per prompt. The output
                size defaults to the source's size after the processor's resizing. `None` draws from text.
            negative_prompt (`str` or `list[str]`, *optional*):
                The text of the unguided condition (default empty).
            height (`int`, *optional*) and width (`int`, *optional*):
                The output size, multiples of 32; defaults to the source's size for edits and to the largest square
                in the processor's pixel budget for text-to-image.
            num_inference_steps (`int`, *optional*):
                Denoising steps; `None` takes the checkpoint's setting (`model.config.image_sampler_defaults`),
                else 30.
            timesteps (`list[float]`, *optional*) or sigmas (`list[float]`, *optional*):
                A custom schedule, for schedulers whose `set_timesteps` takes one. By default `sigmas` run linearly
                from 1 to `1 / steps`, shifted as the scheduler's config says (by the image's token count when
                dynamic).
            guidance_scale (`float`, *optional*):
                Text guidance (<= 1: off); `None` takes the checkpoint's setting, else 4.0.
            image_guidance_scale (`float`, *optional*):
                Source-image guidance of an edit (<= 1: off); `None` takes the checkpoint's setting, else 2.0.
            guidance_interval (`tuple[float, float]`, *optional*):
                `(low, high)` noise levels in [0, 1] where guidance applies; elsewhere only the full condition runs.
            guidance_renorm_min (`float`, *optional*):
                Rescale each guided velocity to at most the norm of the unguided-full one, by a factor no smaller
                than this; `None` turns it off.
            num_images_per_prompt (`int`, defaults to 1):
                Images drawn for each prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                The randomness of the initial noise and of stochastic scheduler steps.
            latents (`torch.Tensor`, *optional*):
                The initial noise itself, `(batch, C, H/32, W/32)`.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`):
                Return an [`EmmaPipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called as `callback(pipe, step, t, {name: tensor})` after each step; a returned `"latents"`
                replaces the latents. Setting `pipe._interrupt = True` there skips the remaining steps.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                The tensors the callback receives.
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}` scales the active LoRA adapters for this call only, as in diffusers.

        Examples:

        Returns:
            [`EmmaPipelineOutput`], or a tuple `(images,)` when `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height, width, num_images_per_prompt, guidance_renorm_min = map(
            as_python_number, (height, width, num_images_per_prompt, guidance_renorm_min)
        )
        num_inference_steps = as_python_number(self.sampler_setting("num_inference_steps", num_inference_steps))
        guidance_scale = as_python_number(self.sampler_setting("guidance_scale", guidance_scale))
        image_guidance_scale = as_python_number(self.sampler_setting("image_guidance_scale", image_guidance_scale))
        image = source_images(image)
        lora_scale = lora_scale_of(attention_kwargs)
        self.check_inputs(
            prompt,
            image,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            guidance_scale,
            image_guidance_scale,
            guidance_interval,
            guidance_renorm_min,
            num_images_per_prompt,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            generator,
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative_prompts = (
            [negative_prompt or ""] * len(prompts)
            if not isinstance(negative_prompt, (list, tuple))
            else list(negative_prompt)
        )
        images = None
        if image is not None:
            sources = list(image) if isinstance(image, (list, tuple)) else [image] * len(prompts)
            images = [self.processor.image_processor.load_image(source) for source in sources]
            if height is None or width is None:
                sizes = {self.processor.image_processor.resized_size(source) for source in images}
                if len(sizes) > 1:
                    raise ValueError(
                        f"the source images resize to different sizes {sorted(sizes)}; pass `height` and `width`"
                    )
                source_height, source_width = sizes.pop()
                height, width = height or source_height, width or source_width
        default_height, default_width = self.default_size()
        height, width = height or default_height, width or default_width

        self._guidance_scale = guidance_scale
        self._image_guidance_scale = image_guidance_scale
        self._guidance_renorm_min = guidance_renorm_min
        self._do_text_guidance = guidance_scale > 1
        self._do_image_guidance = images is not None and image_guidance_scale > 1
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device
        batch_size = len(prompts) * num_images_per_prompt
        config = self.model.config

        latents = self.prepare_latents(
            batch_size,
            config.vae_config["latent_channels"],
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
        )
        with self.scaled_lora(lora_scale):
            context, num_conditions = self.encode_prompt(
                prompts,
                images,
                negative_prompts,
                self._do_text_guidance,
                self._do_image_guidance,
                num_images_per_prompt,
            )
            full_context = context.select(range(batch_size)) if guidance_interval is not None else context

            if (
                timesteps is None
                and sigmas is None
                and "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters
            ):
                sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            image_seq_len = (height // self.vae_scale_factor) * (width // self.vae_scale_factor)
            mu = (
                math.log(self.dynamic_shift(image_seq_len))
                if self.scheduler.config.get("use_dynamic_shifting")
                else None
            )
            timesteps, self._num_timesteps = retrieve_timesteps(
                self.scheduler, num_inference_steps, device, timesteps, sigmas, mu=mu
            )
            # The noise level `t` in [0, 1] of each step (a second-order scheduler visits some twice).
            noise_levels = self.scheduler.sigmas[: len(timesteps)]
            low, high = guidance_interval or (0.0, 1.0)
            guided_steps = [low <= level <= high for level in noise_levels.tolist()]
            step_arguments = inspect.signature(self.scheduler.step).parameters
            stochastic = {"generator": generator} if "generator" in step_arguments else {}

            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    self._current_timestep = t
                    noise_level = noise_levels[i]
                    step_context = context if guided_steps[i] else full_context
                    velocity = self.predict_guided_velocity(
                        latents, noise_level, step_context, num_conditions, guided_steps[i]
                    )
                    latents = self.scheduler.step(velocity, t, latents, return_dict=False, **stochastic)[0]

                    if callback_on_step_end is not None:
                        step_tensors = {"latents": latents}
                        callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = self.latents_from_callback(callback_outputs, latents)
                    progress_bar.update()
            self._current_timestep = None

        if output_type == "latent":
            images_out = latents
        else:
            if not torch.isfinite(latents).all():
                raise ValueError("the latents became non-finite (NaN or inf) during denoising; try float32 weights")
            vae = self.model.vae
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
            images_out = self.vae_image_processor.postprocess(decoded.float(), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out,)
        return EmmaPipelineOutput(images=images_out)


__all__ = ["EmmaPipeline", "EmmaPipelineOutput"]
