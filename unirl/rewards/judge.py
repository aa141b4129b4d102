"""Rewards of the ``reflect`` scenario: the LM's judgement of an image against its prompt.

The LM answers in the project's one format, ``<think>…</think><answer>…</answer>``, with the answer either
``correct`` (the image satisfies the prompt) or ``edit: <instruction>`` (it does not; the instruction is the
correcting edit the DM then applies). :func:`parse_judgement` reads that answer.

- ``judgement`` (``judgement_reward``): 1.0 when the parsed verdict matches ``metadata[i]["verdict"]``
  (``"correct"`` or ``"incorrect"``; ``edit: …`` counts as ``incorrect`` and needs a non-empty instruction), else 0.0.
  A malformed completion (no answer, neither form) scores 0.0 without an exception; a metadata entry without a
  valid ``verdict`` is a data error and raises (``combine`` reports it with the reward's name).

Ground truth: curated ``reflect`` samples carry ``verdict``; for the model's own generations the scenario sets it
from the verifier (``correct`` iff the verifier judges the image correct).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from unirl.rewards.registry import register
from unirl.rewards.text import extract_answer

__all__ = ["EDIT_PREFIX", "VERDICTS", "judgement_reward", "parse_judgement"]

VERDICTS: tuple[str, ...] = ("correct", "incorrect")
EDIT_PREFIX = "edit:"


def parse_judgement(text: Any) -> tuple[str, str] | None:
    """``("correct", "")``, ``("incorrect", instruction)`` or None (malformed) from a completion's ``<answer>``.

    The answer is ``correct`` (case-insensitive, surrounding whitespace ignored) or ``edit: <instruction>`` with a
    non-empty instruction; the same rule as :func:`unirl.eval.benchmarks.parse_verdict`, so RL and the benchmark
    count judgements identically.

    >>> parse_judgement("<think>the circle is blue, not red</think><answer>edit: make the circle red</answer>")
    ('incorrect', 'make the circle red')
    >>> parse_judgement("<think>ok</think>\\n<answer>\\n Correct\\n</answer>")
    ('correct', '')
    >>> parse_judgement("<answer>edit:   </answer>") is None, parse_judgement("correct") is None
    (True, True)
    """
    answer = extract_answer(text)
    if answer is None:
        return None
    if answer.strip().lower() == "correct":
        return ("correct", "")
    if answer.lower().startswith(EDIT_PREFIX) and answer[len(EDIT_PREFIX):].strip():
        return ("incorrect", answer[len(EDIT_PREFIX):].strip())
    return None


def _gold_verdict(meta: Mapping[str, Any] | None, index: int) -> str:
    verdict = meta.get("verdict") if isinstance(meta, Mapping) else None
    if verdict not in VERDICTS:
        raise ValueError(f"metadata[{index}] needs 'verdict' in {VERDICTS} (the ground truth of the judgement), "
                         f"got {verdict!r}")
    return verdict


@register("judgement")
def judgement_reward(
    samples: Sequence[Any], prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> list[float]:
    """1.0 when the completion's verdict (``correct`` / ``edit: …``) matches ``metadata[i]["verdict"]``, else 0.0.

    >>> judgement_reward(
    ...     ["<think>fine</think><answer>correct</answer>", "<think>no</think><answer>edit: add a square</answer>",
    ...      "<think>no</think><answer>edit: add a square</answer>", "garbage", None],
    ...     ["p"] * 5, [{"verdict": v} for v in ("correct", "incorrect", "correct", "correct", "incorrect")])
    [1.0, 1.0, 0.0, 0.0, 0.0]
    """
    scores = []
    for i, (sample, meta) in enumerate(zip(samples, metadata)):
        gold = _gold_verdict(meta, i)
        parsed = parse_judgement(sample)
        scores.append(1.0 if parsed is not None and parsed[0] == gold else 0.0)
    return scores
