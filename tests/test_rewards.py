"""Reward registry (weighting, failures that name the reward) and the text rewards (format, answer accuracy)."""

from __future__ import annotations

import doctest
from collections.abc import Iterator

import pytest

import unirl.rewards.registry as registry
import unirl.rewards.text as text
from unirl.rewards import RewardError, available, combine, get, register, unregister
from unirl.rewards.text import answer_accuracy, extract_answer, format_answer_only_reward, format_reward


@pytest.mark.parametrize("module", [registry, text], ids=lambda m: m.__name__)
def test_doctests(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --- registry ---------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_rewards() -> Iterator[None]:
    """Register a few toy rewards for one test and remove them afterwards."""

    @register("t_length")
    def length(samples, prompts, metadata):
        return [float(len(s)) for s in samples]

    @register("t_flag")
    def flag(samples, prompts, metadata):
        return [float(m["flag"]) for m in metadata]

    @register("t_boom")
    def boom(samples, prompts, metadata):
        raise RuntimeError("scorer crashed")

    @register("t_nan")
    def nan(samples, prompts, metadata):
        return [0.5] + [float("nan")] * (len(samples) - 1)

    @register("t_inf")
    def inf(samples, prompts, metadata):
        return [float("inf")] * len(samples)

    @register("t_short")
    def short(samples, prompts, metadata):
        return [1.0]

    @register("t_none")
    def none(samples, prompts, metadata):
        return [None] * len(samples)

    yield
    for name in ("t_length", "t_flag", "t_boom", "t_nan", "t_inf", "t_short", "t_none"):
        unregister(name)


SAMPLES = ["ab", "abcd", ""]
PROMPTS = ["p0", "p1", "p2"]
META = [{"flag": 1}, {"flag": 0}, {"flag": 1}]


def test_combine_weights_and_per_reward_values(toy_rewards) -> None:
    total, parts = combine({"t_length": 0.5, "t_flag": 2.0}, SAMPLES, PROMPTS, META)
    assert parts == {"t_length": [2.0, 4.0, 0.0], "t_flag": [1.0, 0.0, 1.0]}  # raw, unweighted
    assert total == [0.5 * 2 + 2 * 1, 0.5 * 4 + 0, 0 + 2 * 1]
    total_neg, _ = combine({"t_length": -1.0}, SAMPLES, PROMPTS, META)
    assert total_neg == [-2.0, -4.0, -0.0]
    assert {"t_length", "t_flag", "format", "answer_accuracy", "format_answer_only"} <= set(available())


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("t_boom", "reward 't_boom' raised RuntimeError: scorer crashed"),
        ("t_nan", "reward 't_nan' returned NaN/Inf for samples \\[1, 2\\]"),
        ("t_inf", "reward 't_inf' returned NaN/Inf"),
        ("t_short", "reward 't_short' returned 1 values for 3 samples"),
        ("t_none", "reward 't_none' must return a sequence of numbers"),
        ("t_missing", "unknown reward 't_missing'; available: \\["),
    ],
)
def test_failing_reward_stops_with_its_name(toy_rewards, name: str, match: str) -> None:
    with pytest.raises(RewardError, match=match):
        combine({"t_length": 1.0, name: 1.0}, SAMPLES, PROMPTS, META)


def test_failing_reward_keeps_the_original_exception(toy_rewards) -> None:
    with pytest.raises(RewardError) as info:
        combine({"t_boom": 1.0}, SAMPLES, PROMPTS, META)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_combine_input_errors(toy_rewards) -> None:
    with pytest.raises(ValueError, match="3 samples, 2 prompts"):
        combine({"t_length": 1.0}, SAMPLES, PROMPTS[:2], META)
    with pytest.raises(ValueError, match="no rewards configured"):
        combine({}, SAMPLES, PROMPTS, META)
    with pytest.raises(RewardError, match="weight must be a finite number"):
        combine({"t_length": float("nan")}, SAMPLES, PROMPTS, META)


def test_register_rejects_a_different_function_under_a_taken_name(toy_rewards) -> None:
    with pytest.raises(ValueError, match="'t_length' is already registered"):

        @register("t_length")
        def other(samples, prompts, metadata):
            return [0.0] * len(samples)

    assert get("t_length")(["abc"], ["p"], [{}]) == [3.0]
    with pytest.raises(RewardError, match="unknown reward"):
        unregister("t_never_registered")


# --- text rewards -----------------------------------------------------------------------------------------------

MULTILINE = "<think>\nThere are two circles\nand one more.\n</think>\n\n<answer>\n3\n</answer>\n"


@pytest.mark.parametrize(
    "completion",
    [
        MULTILINE,
        "<think>short</think><answer>red</answer>",
        "  <think></think> <answer>x</answer>",  # empty reasoning is allowed, the tags are there in order
    ],
)
def test_format_reward_accepts(completion: str) -> None:
    assert format_reward([completion], ["q"], [{}]) == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "3",
        None,
        42,
        b"<think>a</think><answer>b</answer>",
        "<think>a</think>",  # no answer
        "<answer>b</answer>",  # no think
        "<answer>b</answer><think>a</think>",  # wrong order
        "<think>a</think><answer>   </answer>",  # empty answer
        "<think>a</think><answer>b</answer> and then more text",
        "preamble <think>a</think><answer>b</answer>",
        "<think>a<think>b</think><answer>c</answer>",  # duplicated tag
        "<think>a</think><answer>b</answer><answer>c</answer>",
        "<think>a</think><answer>b",  # unclosed
        "<think>a<answer>b</answer></think>",  # nested
    ],
)
def test_malformed_completions_score_zero_without_exception(completion) -> None:
    assert format_reward([completion], ["q"], [{}]) == [0.0]
    # accuracy ignores the format: it only needs an <answer> whose content is "b"
    acc = answer_accuracy([completion], ["q"], [{"answer": "b"}])
    assert acc == [1.0 if extract_answer(completion) == "b" else 0.0]


def test_answer_accuracy_malformed_scores_zero() -> None:
    bad = [None, 42, "b", "<answer>b", "<answer></answer>", "</answer>b<answer>"]
    assert answer_accuracy(bad, ["q"] * len(bad), [{"answer": "b"}] * len(bad)) == [0.0] * len(bad)


def test_format_answer_only_variant() -> None:
    samples = ["<answer>\na blue\ntriangle\n</answer>", "<think>x</think><answer>y</answer>", "y", "<answer></answer>"]
    assert format_answer_only_reward(samples, ["q"] * 4, [{}] * 4) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("Three.", 3),
        ("3", "three"),
        ("  RED ", "red"),
        ("twenty-one", "21"),
        ("Twenty one", 21),
        ("3.0", "3"),
        ('"blue"', "blue"),
        ("Left  of!", "left of"),
        ("two red squares", "2 red squares"),
        ("'4'.", 4.0),
        ("crimson", ["red", "crimson"]),
    ],
)
def test_answer_accuracy_normalisation_matches(predicted: str, gold) -> None:
    completion = f"<think>reasoning\nover lines</think>\n<answer>{predicted}</answer>"
    assert answer_accuracy([completion], ["q"], [{"answer": gold}]) == [1.0]


@pytest.mark.parametrize(("predicted", "gold"), [("4", 3), ("red", "blue"), ("3 red", "3"), ("31", "thirteen")])
def test_answer_accuracy_mismatches(predicted: str, gold) -> None:
    assert answer_accuracy([f"<answer>{predicted}</answer>"], ["q"], [{"answer": gold}]) == [0.0]


def test_answer_accuracy_missing_ground_truth_is_an_error() -> None:
    match = "reward 'answer_accuracy' raised ValueError: metadata\\[1\\] has no 'answer'"
    with pytest.raises(RewardError, match=match):
        combine({"answer_accuracy": 1.0}, ["<answer>1</answer>"] * 2, ["q", "q"], [{"answer": 1}, {}])


def test_extract_answer() -> None:
    assert extract_answer(MULTILINE) == "3"
    assert extract_answer("<answer>first</answer> ... <answer>\n last \n</answer>") == "last"
    assert extract_answer("no tags") is None
    assert extract_answer(None) is None
