"""Tokenizer: a byte-level BPE trained offline on the curated corpus, saved in the standard transformers layout.

``train_tokenizer`` trains a byte-level BPE (the Qwen2 / GPT-2 family's scheme, so every string round-trips
losslessly) with the ``tokenizers`` library and wraps it in transformers' fast tokenizer class; the saved
directory (``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``) loads with
``AutoTokenizer.from_pretrained``. ``load_tokenizer`` loads either that directory or a real Qwen2.5-VL tokenizer
directory and adds any of the project's tokens it lacks (the task query markers and the think/answer tags).

Special tokens are resolved by NAME at run time (:func:`special_token_ids`); no id is ever hard-coded. The
think/answer tags are atomic added tokens but not "special", so ``decode(..., skip_special_tokens=True)`` keeps
them in the text the verifier and the format rewards read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from unirl.atomic import staged_dir
from unirl.config import option

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a turn; the EOS of generation
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
T2I_QUERY = "<|t2i_query|>"
I2I_QUERY = "<|i2i_query|>"
# Control tokens: atomic and skipped by ``decode(skip_special_tokens=True)``.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, T2I_QUERY,
                                   I2I_QUERY)
# Format tags: atomic, but part of the visible text.
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen-style ChatML. A message's content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}
# parts; an image part becomes one ``<|vision_start|><|image_pad|><|vision_end|>`` group (the model expands the pad
# to the image's token count).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the model needs, looked up by name in a given tokenizer."""

    pad: int
    im_start: int
    eos: int  # <|im_end|>
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    t2i_query: int
    i2i_query: int
    think: int
    think_end: int
    answer: int
    answer_end: int

    def query(self, task: str) -> int:
        """Placeholder id of the task's query tokens (``t2i`` or ``i2i``)."""
        if task not in ("t2i", "i2i"):
            raise ValueError(f"unknown query task {task!r}; expected 't2i' or 'i2i'")
        return self.t2i_query if task == "t2i" else self.i2i_query


_NAMES = {
    "pad": PAD, "im_start": IM_START, "eos": IM_END, "vision_start": VISION_START, "vision_end": VISION_END,
    "image_pad": IMAGE_PAD, "video_pad": VIDEO_PAD, "t2i_query": T2I_QUERY, "i2i_query": I2I_QUERY,
    "think": "<think>", "think_end": "</think>", "answer": "<answer>", "answer_end": "</answer>",
}


def special_token_ids(tok: PreTrainedTokenizerBase) -> SpecialTokens:
    """Resolve every token the model uses by its string; raise a clear error naming any that is missing."""
    vocab = tok.get_vocab()
    missing = [s for s in _NAMES.values() if s not in vocab]
    if missing:
        raise KeyError(
            f"tokenizer {getattr(tok, 'name_or_path', '')!r} lacks the token(s) {missing}; "
            "load it with unirl.models.tokenizer.load_tokenizer (which adds them) or retrain it with train_tokenizer"
        )
    return SpecialTokens(**{field: vocab[s] for field, s in _NAMES.items()})


def _finalise(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the project's tokens if absent, and set EOS/pad, left padding and the chat template."""
    vocab = tok.get_vocab()
    new_special = [s for s in SPECIAL_TOKENS if s not in vocab]
    if new_special:
        tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in new_special], special_tokens=True)
    new_tags = [s for s in TAG_TOKENS if s not in tok.get_vocab()]
    if new_tags:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in new_tags])
    tok.eos_token = IM_END
    tok.pad_token = PAD
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def train_tokenizer(
    lines: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``lines`` and save it (atomically) to ``out_dir`` in the transformers layout.

    Returns the tokenizer as loaded back from ``out_dir``, so what callers use is exactly what was saved.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols + {len(SPECIAL_TOKENS)} specials")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((line for line in lines if line), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
    tok = _finalise(tok)
    save_tokenizer(tok, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Write ``tok`` to ``out_dir`` atomically: save into a sibling temp dir, then swap it in."""
    with staged_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
    return Path(out_dir)




@dataclass
class TokenizerConfig:
    """The ``tokenizer`` stage (``params.yaml`` section ``tokenizer``)."""

    corpus: str = option("data/curated/corpus.txt", "curated text corpus, one text per line")
    out_dir: str = option("data/tokenizer", "output directory (tokenizer.json, tokenizer_config.json, template)")
    vocab_size: int = option(1024, "BPE vocabulary size including the special tokens")
    min_frequency: int = option(2, "minimum pair frequency for a BPE merge")


def build_tokenizer(cfg: TokenizerConfig) -> dict[str, float]:
    """Stage entry point: train on ``cfg.corpus``, save to ``cfg.out_dir``; return metrics for DVC / Dagster."""
    corpus = Path(cfg.corpus)
    if not corpus.is_file():
        raise FileNotFoundError(f"tokenizer corpus {corpus} not found; run the curate stage first (dvc repro curate)")
    lines = corpus.read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(lines, cfg.out_dir, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    n_tokens = sum(len(tok(line, add_special_tokens=False)["input_ids"]) for line in lines)
    return {"vocab_size": float(len(tok)), "corpus_lines": float(len(lines)),
            "tokens_per_line": n_tokens / max(len(lines), 1)}


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory (ours or a Qwen2.5-VL one) and make sure it has every token the model needs."""
    p = Path(path)
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"no tokenizer at {p} (expected tokenizer.json / tokenizer_config.json); "
            "build it with the `tokenizer` stage (dvc repro tokenizer) or point to a Qwen2.5-VL tokenizer directory"
        )
    tok = AutoTokenizer.from_pretrained(p, clean_up_tokenization_spaces=False)
    tok = _finalise(tok)
    special_token_ids(tok)  # fail early, naming what is missing
    return tok
