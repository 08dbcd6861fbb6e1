"""emma_hf: EMMA (arXiv 2512.04810) for transformers, diffusers and PEFT."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_emma import EmmaConfig
from .modeling_emma import EmmaContext, EmmaForConditionalGeneration, EmmaModel, EmmaPreTrainedModel


AutoConfig.register(EmmaConfig.model_type, EmmaConfig, exist_ok=True)
AutoModel.register(EmmaConfig, EmmaModel, exist_ok=True)
AutoModelForImageTextToText.register(EmmaConfig, EmmaForConditionalGeneration, exist_ok=True)

__all__ = ["EmmaConfig", "EmmaContext", "EmmaForConditionalGeneration", "EmmaModel", "EmmaPreTrainedModel"]
