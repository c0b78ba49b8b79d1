"""The MoAI model: configuration, modules, loading, quantization and generation."""

from .config import ATTN_IMPLEMENTATIONS, MoAIConfig, MoAIStructure, check_attn_implementation
from .generation import GenerateOutput, GenerationSettings
from .internlm2 import KVCache
from .loading import resolve_checkpoint, save_moai
from .moai import MoAIForCausalLM, MoAIOutput, load_moai
from .quantization import QUANTIZATION_MODES, check_quantization
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
    "check_quantization",
    "check_attn_implementation",
    "QUANTIZATION_MODES",
    "ATTN_IMPLEMENTATIONS",
]
