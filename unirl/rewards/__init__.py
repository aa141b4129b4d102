"""Rewards: a registry of plain functions ``(samples, prompts, metadata) -> list[float]`` combined by weights.

``unirl.rewards.text`` holds the LM rewards (format, answer accuracy); image rewards (verifier, edit, cycle, JPEG,
CLIP) register themselves from their own modules.
"""

from unirl.rewards import image, text  # noqa: F401  (registers the image and text rewards)
from unirl.rewards.registry import RewardError, RewardFn, available, combine, get, register, unregister

__all__ = ["RewardError", "RewardFn", "available", "combine", "get", "register", "unregister"]
