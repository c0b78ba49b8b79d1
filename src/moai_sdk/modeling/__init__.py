"""The MoAI model: configuration, modules, loading, quantization and generation."""

from .config import MoAIConfig, MoAIStructure
from .generation import GenerateOutput, GenerationSettings
from .internlm2 import KVCache
from .loading import load_moai, resolve_checkpoint, save_moai
from .moai import MoAIForCausalLM, MoAIOutput
from .vision import interpolate_position_table

__all__ = [
    "MoAIConfig",
    "MoAIStructure",
    "MoAIForCausalLM",
    "MoAIOutput",
    "GenerationSettings",
    "GenerateOutput",
    "KVCache",
    "load_moai",
    "save_moai",
    "resolve_checkpoint",
    "interpolate_position_table",
]
