"""Text rewards for the LM side: the ``<think>…</think><answer>…</answer>`` format and answer accuracy.

- ``format`` (``format_reward``): 1.0 when the completion is exactly one ``<think>…</think>`` followed by one
  non-empty ``<answer>…</answer>``, with only whitespace around and between them; contents may span lines.
- ``format_answer_only`` (``format_answer_only_reward``): the same for a lone ``<answer>…</answer>``.
- ``answer_accuracy``: 1.0 when the ``<answer>`` content equals ``metadata[i]["answer"]`` (a string, a number or a
  list of accepted answers) after ``normalize_answer``: case, Unicode form, whitespace, surrounding quotes, trailing
  punctuation, number words vs digits (``"Three."`` == ``"3"``), and numeric forms (``"3.0"`` == ``"3"``).

A malformed completion (no tags, wrong order, not a string) scores 0.0 without an exception. A missing ground-truth
``answer`` in the metadata is a data error and raises (``combine`` reports it with the reward's name).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from unirl.rewards.registry import register

__all__ = ["answer_accuracy", "extract_answer", "format_answer_only_reward", "format_reward", "normalize_answer"]

_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER_ONLY = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

_UNITS = "zero one two three four five six seven eight nine ten".split()
_UNITS += "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | _TENS
_TRAILING_PUNCT = ".,!?;:。"
_QUOTES = "\"'`“”‘’"


def _tag_counts_ok(text: str, tags: Sequence[str]) -> bool:
    return all(text.count(t) == (1 if t in tags else 0) for t in _TAGS)


def _format_score(text: Any, pattern: re.Pattern[str], tags: Sequence[str]) -> float:
    if not isinstance(text, str) or not _tag_counts_ok(text, tags):
        return 0.0
    match = pattern.fullmatch(text)
    return 1.0 if match is not None and match.groups()[-1].strip() else 0.0


@register("format")
def format_reward(
    samples: Sequence[Any], prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> list[float]:
    """1.0 for ``<think>…</think><answer>…</answer>`` (in that order, once each, answer non-empty), else 0.0.

    >>> format_reward(
    ...     ["<think>\\n2 circles\\nplus 1\\n</think>\\n<answer>\\n3\\n</answer>",
    ...      "<answer>3</answer><think>x</think>", "just 3", None],
    ...     ["q"] * 4, [{}] * 4)
    [1.0, 0.0, 0.0, 0.0]
    """
    return [_format_score(s, _THINK_ANSWER, ("<think>", "</think>", "<answer>", "</answer>")) for s in samples]


@register("format_answer_only")
def format_answer_only_reward(
    samples: Sequence[Any], prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> list[float]:
    """1.0 for a lone non-empty ``<answer>…</answer>`` (whitespace around allowed), else 0.0.

    >>> format_answer_only_reward(["<answer>a red\\nsquare</answer>\\n", "<think>x</think><answer>y</answer>",
    ...                            "<answer> </answer>"], ["q"] * 3, [{}] * 3)
    [1.0, 0.0, 0.0]
    """
    return [_format_score(s, _ANSWER_ONLY, ("<answer>", "</answer>")) for s in samples]


def extract_answer(text: Any) -> str | None:
    """Stripped content of the last ``<answer>…</answer>`` (across newlines); None if there is none.

    >>> extract_answer("<think>...</think>\\n<answer>\\n  Blue\\n</answer>")
    'Blue'
    >>> extract_answer("<answer>unclosed") is None
    True
    """
    if not isinstance(text, str):
        return None
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def _canonical_number(token: str) -> str:
    try:
        value = float(token.replace(",", "")) if re.fullmatch(r"[+-]?[\d,]*\.?\d+", token) else None
    except ValueError:
        value = None
    if value is None:
        return token
    return str(int(value)) if value.is_integer() else repr(value)


def normalize_answer(text: Any) -> str:
    """Canonical form for comparing answers: lower case, single spaces, no surrounding quotes or trailing
    punctuation, number words as digits (0-99), numbers without trailing zeros.

    >>> normalize_answer('  "Twenty-One  Red squares."  ')
    '21 red squares'
    >>> normalize_answer("3.0") == normalize_answer("three")
    True
    """
    s = unicodedata.normalize("NFKC", str(text)).lower()
    s = " ".join(s.split())
    prev = None
    while s != prev:  # peel quotes and trailing punctuation in any order ('"3."', '3".')
        prev = s
        s = s.strip().strip(_QUOTES).rstrip(_TRAILING_PUNCT)
    words = re.sub(r"\b(" + "|".join(_TENS) + r")-(?=[a-z])", r"\1 ", s).split()
    out: list[str] = []
    for w in words:
        n = _NUMBER_WORDS.get(w)
        if n is not None and 0 < n < 10 and out and out[-1] in {str(t) for t in _TENS.values()}:
            out[-1] = str(int(out[-1]) + n)  # "twenty one" -> 21
        elif n is not None:
            out.append(str(n))
        else:
            out.append(_canonical_number(w))
    return " ".join(out)


def _gold_answers(meta: Mapping[str, Any] | None, index: int) -> list[str]:
    if not isinstance(meta, Mapping) or "answer" not in meta:
        raise ValueError(f"metadata[{index}] has no 'answer' (the ground truth answer_accuracy compares against)")
    gold = meta["answer"]
    return [normalize_answer(g) for g in (gold if isinstance(gold, list | tuple) else [gold])]


@register("answer_accuracy")
def answer_accuracy(
    samples: Sequence[Any], prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> list[float]:
    """1.0 when the normalised ``<answer>`` content equals (one of) ``metadata[i]["answer"]``, else 0.0.

    >>> answer_accuracy(
    ...     ["<think>1+2</think><answer>Three.</answer>", "<answer>RED</answer>", "<answer>4</answer>", "3"],
    ...     ["q"] * 4, [{"answer": 3}, {"answer": ["red", "crimson"]}, {"answer": "3"}, {"answer": "3"}])
    [1.0, 1.0, 0.0, 0.0]
    """
    scores = []
    for i, (sample, meta) in enumerate(zip(samples, metadata)):
        gold = _gold_answers(meta, i)
        predicted = extract_answer(sample)
        scores.append(1.0 if predicted is not None and normalize_answer(predicted) in gold else 0.0)
    return scores
