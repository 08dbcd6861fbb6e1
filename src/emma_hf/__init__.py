"""emma_hf: EMMA (arXiv 2512.04810) for transformers, diffusers and PEFT."""

import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .configuration_emma import EmmaConfig
from .modeling_emma import EmmaContext, EmmaForConditionalGeneration, EmmaModel, EmmaPreTrainedModel
from .pipeline_emma import EmmaPipeline, EmmaPipelineOutput
from .processing_emma import EmmaImageProcessor, EmmaProcessor
from .shipped import shipped_model_path


AutoConfig.register(EmmaConfig.model_type, EmmaConfig, exist_ok=True)
AutoModel.register(EmmaConfig, EmmaModel, exist_ok=True)
AutoModelForImageTextToText.register(EmmaConfig, EmmaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(EmmaConfig, EmmaForConditionalGeneration, exist_ok=True)
# transformers' class for models that take several modalities and generate (the "any-to-any" pipeline's), where the
# installed release has it.
if hasattr(transformers, "AutoModelForMultimodalLM"):
    transformers.AutoModelForMultimodalLM.register(EmmaConfig, EmmaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(EmmaConfig, EmmaProcessor, exist_ok=True)

# Saving then copies the remote-code files beside the weights, so a checkpoint loads where emma_hf is not installed.
EmmaConfig.register_for_auto_class("AutoConfig")
EmmaModel.register_for_auto_class("AutoModel")
EmmaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
EmmaImageProcessor.register_for_auto_class("AutoImageProcessor")
EmmaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "EmmaConfig",
    "EmmaContext",
    "EmmaForConditionalGeneration",
    "EmmaImageProcessor",
    "EmmaModel",
    "EmmaPipeline",
    "EmmaPipelineOutput",
    "EmmaPreTrainedModel",
    "EmmaProcessor",
    "shipped_model_path",
]
