"""The unified model: Qwen2.5-VL LM expert + SANA DM expert + task queries + connector, and its tokenizer."""

from unirl.models.config import ModelConfig, load_model_config
from unirl.models.outputs import Conditioning, TextSamples
from unirl.models.scheduler import FlowMatchEulerScheduler
from unirl.models.tokenizer import SpecialTokens, load_tokenizer, special_token_ids, train_tokenizer
from unirl.models.unified import TRAIN_MODES, UnifiedModel

__all__ = [
    "TRAIN_MODES",
    "Conditioning",
    "FlowMatchEulerScheduler",
    "ModelConfig",
    "SpecialTokens",
    "TextSamples",
    "UnifiedModel",
    "load_model_config",
    "load_tokenizer",
    "special_token_ids",
    "train_tokenizer",
]
