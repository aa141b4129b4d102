"""Tokenizer: trained offline, standard transformers layout, special tokens by name, chat template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from unirl.models.tiny import builtin_corpus
from unirl.models.tokenizer import (
    SPECIAL_TOKENS,
    TAG_TOKENS,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
)

TEXTS = [
    "a photo of two red circles left of a blue square",
    "<think>3 + 1 = 4 circles</think><answer>four</answer>",
    "Unicode too: café, 三角形, emoji 🔺 and\ttabs\nnewlines  double  spaces",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(builtin_corpus(), d, vocab_size=400, min_frequency=1)
    return d


def test_saved_in_the_standard_layout_and_loads_with_autotokenizer(tok_dir):
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in tok_dir.iterdir()}
    auto = AutoTokenizer.from_pretrained(tok_dir)
    ours = load_tokenizer(tok_dir)
    assert auto.get_vocab() == ours.get_vocab()
    for text in TEXTS:
        assert auto(text)["input_ids"] == ours(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_lossless(tok_dir, text):
    tok = load_tokenizer(tok_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_special_tokens_resolved_by_name(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = special_token_ids(tok)
    assert ids.eos == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert ids.pad == tok.convert_tokens_to_ids("<|endoftext|>") == tok.pad_token_id
    assert ids.image_pad == tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.query("t2i") == tok.convert_tokens_to_ids("<|t2i_query|>")
    assert ids.query("i2i") == tok.convert_tokens_to_ids("<|i2i_query|>")
    # every control token and tag is one atomic id
    for s in SPECIAL_TOKENS + TAG_TOKENS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s
    # control tokens are dropped by skip_special_tokens, the format tags are kept
    text = "<|vision_start|><|image_pad|><|vision_end|><think>x</think><answer>y</answer><|im_end|>"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == "<think>x</think><answer>y</answer>"
    with pytest.raises(ValueError, match="unknown query task"):
        ids.query("video")


def test_chat_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a red circle"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    with_image = tok.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
            {"role": "assistant", "content": "a square"},
        ],
        tokenize=False,
    )
    assert with_image == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n"
        "<|im_start|>assistant\na square<|im_end|>\n"
    )
    assert tok.padding_side == "left"


def test_foreign_tokenizer_gets_the_missing_tokens_added(tmp_path):
    """A tokenizer without our tokens (like a stock Qwen one lacks the query markers) is completed on load."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        builtin_corpus(),
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe)
    with pytest.raises(KeyError, match="t2i_query"):
        special_token_ids(plain)
    plain.save_pretrained(tmp_path / "plain")
    completed = load_tokenizer(tmp_path / "plain")
    assert special_token_ids(completed).pad == bpe.token_to_id("<|endoftext|>")  # existing ids are kept


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        load_tokenizer(tmp_path / "none")


def test_retraining_replaces_the_directory_atomically(tmp_path):
    d = tmp_path / "tok"
    train_tokenizer(builtin_corpus(), d, vocab_size=300, min_frequency=1)
    (d / "stale.txt").write_text("from an older run")
    tok = train_tokenizer(builtin_corpus(), d, vocab_size=350, min_frequency=1)
    assert not (d / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp or backup dirs left
    assert len(load_tokenizer(d)) == len(tok)


def test_vocab_size_too_small_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=100)


def test_build_tokenizer_stage(tmp_path):
    from unirl.models.tokenizer import TokenizerConfig, build_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(builtin_corpus()) + "\n", encoding="utf-8")
    cfg = TokenizerConfig(corpus=str(corpus), out_dir=str(tmp_path / "tok"), vocab_size=400, min_frequency=1)
    metrics = build_tokenizer(cfg)
    tok = load_tokenizer(tmp_path / "tok")
    assert metrics["vocab_size"] == len(tok) and metrics["corpus_lines"] == len(builtin_corpus())
    assert 1 <= metrics["tokens_per_line"] < 20  # whole words merged: far fewer tokens than bytes
    with pytest.raises(FileNotFoundError, match="curate"):
        build_tokenizer(TokenizerConfig(corpus=str(tmp_path / "missing.txt"), out_dir=str(tmp_path / "t2")))
