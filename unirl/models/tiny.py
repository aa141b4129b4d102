"""A tiny unified model from a built-in Shapes-world corpus, for tests, benchmarks and smoke runs.

The real pipeline trains the tokenizer on the curated corpus (the ``tokenizer`` stage); this module builds the same
kind of tokenizer from a few hundred template sentences over the Shapes vocabulary, so any test can get a
complete, working tiny model in about a second without the data stages.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from unirl.data.shapes import COLORS, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES
from unirl.models.config import ModelConfig, load_model_config
from unirl.models.tokenizer import train_tokenizer
from unirl.models.unified import UnifiedModel


def builtin_corpus() -> list[str]:
    """Template sentences covering the Shapes prompts, questions, edits and the think/answer format."""
    lines = []
    for color, shape in itertools.product(COLORS, SHAPES):
        lines.append(f"a photo of a {color} {shape}")
        lines.append(f"make the {shape} {color}")
        lines.append(f"<think>the {shape} is {color}</think><answer>{color}</answer>")
        for n in NUMBER_WORDS[2:5]:
            lines.append(f"a photo of {n} {color} {PLURALS[shape]}")
        for rel in RELATIONS:
            lines.append(f"a {color} {shape} {rel} a {COLORS[0]} {SHAPES[0]}")
    lines += ["How many circles are in the image?", "Is the image correct? yes, no. Instruction: add a square.",
              "Rewrite the prompt: a red circle above a blue square."]
    return lines


def tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    return train_tokenizer(builtin_corpus(), out_dir, vocab_size=vocab_size, min_frequency=1)


def tiny_model(workdir: str | os.PathLike, seed: int = 0, config: ModelConfig | None = None) -> UnifiedModel:
    """Tokenizer (saved under ``workdir/tokenizer``) + a freshly initialised model of the ``tiny`` profile."""
    tok = tiny_tokenizer(Path(workdir) / "tokenizer")
    torch.manual_seed(seed)
    return UnifiedModel.build(config or load_model_config("tiny"), tok)
