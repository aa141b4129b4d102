"""Reward registry: plain functions ``(samples, prompts, metadata) -> list[float]`` looked up by name and combined.

A reward function takes the batch of ``samples`` (completions as ``str`` for LM rewards, images for DM rewards),
the ``prompts`` (one per sample) and ``metadata`` (one dict per sample: ground truth, GenEval spec, ...) and returns
one finite float per sample. Register it with ``@register("name")``; ``combine({"name": weight, ...}, ...)`` calls
each and sums them with their weights (weights come from ``params.yaml``).

A reward is never silently zeroed: if it raises, returns the wrong number of values, a non-number, NaN or Inf,
``combine`` raises ``RewardError`` naming the reward so the step stops with a clear message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["RewardError", "RewardFn", "available", "combine", "get", "register", "unregister"]

RewardFn = Callable[[Sequence[Any], Sequence[str], Sequence[Mapping[str, Any]]], list[float]]

_REGISTRY: dict[str, RewardFn] = {}


class RewardError(RuntimeError):
    """A reward function failed or returned invalid values; the message names the reward."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; a second, different function under the same name is an error.

    >>> @register("doc_constant")
    ... def constant(samples, prompts, metadata):
    ...     return [1.0 for _ in samples]
    >>> get("doc_constant")(["a", "b"], ["p", "p"], [{}, {}])
    [1.0, 1.0]
    >>> unregister("doc_constant")
    """

    def decorator(fn: RewardFn) -> RewardFn:
        previous = _REGISTRY.get(name)
        if previous is not None and _origin(previous) != _origin(fn):
            raise ValueError(
                f"reward {name!r} is already registered by {previous.__module__}.{previous.__qualname__}; "
                "pick another name"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive use); unknown names are an error."""
    if _REGISTRY.pop(name, None) is None:
        raise RewardError(f"unknown reward {name!r}; available: {available()}")


def _origin(fn: RewardFn) -> tuple[str, str]:
    """Where ``fn`` is defined (file, qualified name): re-registering it on a module reload is not a clash."""
    code = getattr(fn, "__code__", None)
    return (code.co_filename if code is not None else fn.__module__, getattr(fn, "__qualname__", repr(fn)))


def get(name: str) -> RewardFn:
    """The reward function registered under ``name`` (``RewardError`` listing the available names otherwise)."""
    _load_builtin_rewards()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RewardError(f"unknown reward {name!r}; available: {available()}") from None


def available() -> list[str]:
    """Sorted names of the registered rewards."""
    _load_builtin_rewards()
    return sorted(_REGISTRY)


def combine(
    rewards: Mapping[str, float],
    samples: Sequence[Any],
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the named rewards: ``(total per sample, {name: raw per-sample values})``.

    >>> total, parts = combine(
    ...     {"format": 0.5, "answer_accuracy": 1.0},
    ...     ["<think>2+2</think><answer>4</answer>", "<answer>five</answer>"],
    ...     ["2+2?", "2+3?"],
    ...     [{"answer": "4"}, {"answer": "5"}],
    ... )
    >>> total, parts["format"], parts["answer_accuracy"]
    ([1.5, 1.0], [1.0, 0.0], [1.0, 1.0])
    """
    n = len(samples)
    if len(prompts) != n or len(metadata) != n:
        raise ValueError(
            f"combine: got {n} samples, {len(prompts)} prompts and {len(metadata)} metadata entries; "
            "pass one prompt and one metadata dict per sample"
        )
    if not rewards:
        raise ValueError("combine: no rewards configured (the reward weights mapping is empty)")
    total = [0.0] * n
    parts: dict[str, list[float]] = {}
    for name, weight in rewards.items():
        if not isinstance(weight, int | float) or not math.isfinite(weight):
            raise RewardError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        fn = get(name)
        try:
            values = fn(samples, prompts, metadata)
        except Exception as e:
            raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
        parts[name] = _validate(name, values, n)
        total = [t + weight * v for t, v in zip(total, parts[name])]
    return total, parts


def _validate(name: str, values: Any, n: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name!r} must return a sequence of numbers, got {values!r:.200}") from e
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} samples")
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        shown = [out[i] for i in bad[:5]]
        raise RewardError(f"reward {name!r} returned NaN/Inf for samples {bad[:10]} (values {shown})")
    return out


def _load_builtin_rewards() -> None:
    """Import the modules whose rewards register themselves on import (text rewards need nothing heavy)."""
    from unirl.rewards import text  # noqa: F401
