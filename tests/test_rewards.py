r"""Rewards: a table of completions and ground truths with the scores they must get, then the interface."""

import pytest
import torch

from durian_lightning.core import rewards as R
from durian_lightning.core.rewards import (
    RewardError,
    WeightedReward,
    accuracy_reward,
    answers_match,
    extract_answer,
    extract_boxed,
    format_reward,
    load_reward_function,
    parse_number,
)

T = "<think>reasoning here</think> "

# (completion, ground truth, format score, accuracy score)
TABLE = [
    # well-formed and right
    (T + r"The answer is \boxed{5}.", "5", 1, 1),
    (T + r"\boxed{0.5}", "1/2", 1, 1),
    (T + r"\boxed{1/2}", "0.5", 1, 1),
    (T + r"\boxed{\frac{1}{2}}", "0.5", 1, 1),
    (T + r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", 1, 1),
    (T + r"\boxed{3.0}", "3", 1, 1),
    (T + r"\boxed{-2}", "-2.00", 1, 1),
    (T + r"\boxed{1,000}", "1000", 1, 1),
    (T + r"\boxed{60^\circ}", "60", 1, 1),
    (T + r"\boxed{60°}", "60", 1, 1),
    (T + r"\boxed{\text{blue}}", "Blue", 1, 1),
    (T + r"\boxed{ red }", "red", 1, 1),
    (T + r"\boxed{B}", "B", 1, 1),
    (T + r"\boxed{(C)}", "C", 1, 1),
    (T + r"\boxed{C. 12 cm}", "C", 1, 1),
    (T + r"\boxed{b}", "(B)", 1, 1),
    (T + r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1, 1),  # symbolic, through math-verify
    (T + r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1, 1),
    (T + r"\boxed{x+1}", "1+x", 1, 1),
    (T + r"\boxed{\{1, 2\}}", r"\{1,2\}", 1, 1),
    (T + r"first \boxed{3}, no wait \boxed{4}", "4", 1, 1),  # the last box wins
    (T + r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1, 1),  # nested braces
    (T + r"$\boxed{7}$", "7", 1, 1),
    (T + r"\fbox{9}", "9", 1, 1),
    (T + r"<answer>\boxed{6}</answer>", "6", 1, 1),
    # well-formed but wrong
    (T + r"\boxed{6}", "5", 1, 0),
    (T + r"\boxed{0.51}", "1/2", 1, 0),
    (T + r"\boxed{A}", "B", 1, 0),
    (T + r"\boxed{3\sqrt{3}}", r"\sqrt{12}", 1, 0),
    (T + r"first \boxed{4}, no wait \boxed{3}", "4", 1, 0),
    (T + r"\boxed{}", "5", 1, 0),
    (T + r"\boxed{green}", "red", 1, 0),
    (T + r"\boxed{Because B is bigger}", "B", 1, 0),  # a sentence is not the letter B
    # right answer, broken format
    (r"\boxed{5}", "5", 0, 1),  # no reasoning block
    (r"<think></think>\boxed{5}", "5", 0, 1),  # empty reasoning
    (r"<think>a</think><think>b</think>\boxed{5}", "5", 0, 1),  # two reasoning blocks
    (r"Sure! <think>a</think>\boxed{5}", "5", 0, 1),  # text before <think>
    (r"<think>a \boxed{5}</think>", "5", 0, 1),  # the box is inside the reasoning
    ("<think>a</think><answer>5</answer>", "5", 0, 1),  # answer tag instead of a box
    # malformed
    ("<think>a</think> the answer is 5", "5", 0, 0),  # no final answer at all
    (T + r"\boxed{5", "5", 0, 0),  # box never closed (cut off)
    (T + r"\boxed{3} then \boxed{4", "3", 0, 0),  # last box cut off: no final answer
    ("<think>unclosed reasoning \\boxed{5}", "5", 0, 1),
    ("", "5", 0, 0),
    ("<answer></answer>", "5", 0, 0),
    (T + r"\boxed 5", "5", 0, 0),  # \boxed without braces
    (T + r"\boxed{1/0}", "1/0", 1, 1),  # same string, though not a number
    (T + r"\boxed{1/0}", "0", 1, 0),
]


def test_table_covers_every_verdict_without_repeating_a_case():
    # each format / accuracy combination has cases (a right answer badly formatted, a wrong one well formatted, ...)
    verdicts = {(fmt, acc) for _, _, fmt, acc in TABLE}
    assert verdicts == {(0, 0), (0, 1), (1, 0), (1, 1)}
    cases = [(completion, answer) for completion, answer, _, _ in TABLE]
    assert len(set(cases)) == len(cases), "a case appears twice (with possibly different expectations)"


@pytest.mark.parametrize("completion, answer, fmt, acc", TABLE)
def test_reward_table(completion, answer, fmt, acc):
    assert format_reward([completion], [answer]) == [float(fmt)]
    assert accuracy_reward([completion], [answer]) == [float(acc)]
    total = WeightedReward.paper_default()([completion], [answer]).total
    assert total.item() == pytest.approx(0.1 * fmt + 0.9 * acc)


def test_extraction():
    assert extract_boxed(r"\boxed{a{b}c} and \boxed{d}") == "d"
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed {x}") == "x"
    assert extract_answer("<answer> 12 </answer> and <answer>13</answer>") == "13"
    assert extract_answer("nothing") is None


def test_parse_number_is_exact():
    assert parse_number("0.1") * 10 == 1
    assert parse_number(r"-\frac{3}{6}") == parse_number("-0.5")
    for not_a_number in ["x", "1/0", "", ".", "1.2.3", r"\sqrt{2}", "1,00"]:
        assert parse_number(not_a_number) is None, not_a_number


def test_symbolic_check_can_be_switched_off():
    assert answers_match(r"2\sqrt{3}", r"\sqrt{12}", symbolic=True)
    assert not answers_match(r"2\sqrt{3}", r"\sqrt{12}", symbolic=False)
    assert R.HAS_MATH_VERIFY  # the dev extra installs it; without it the table's symbolic rows would fail


def test_symbolic_check_works_off_the_main_thread():
    import threading

    result = []
    thread = threading.Thread(target=lambda: result.append(answers_match(r"2\sqrt{3}", r"\sqrt{12}")))
    thread.start()
    thread.join()
    assert result == [True]


def test_weighted_reward_components_and_custom_functions():
    def length_penalty(completions, answers, **fields):
        return [-len(c) / 100 for c in completions]

    reward = WeightedReward([("acc", accuracy_reward, 1.0), ("len", length_penalty, 0.5)])
    out = reward([T + r"\boxed{1}", "x"], ["1", "1"])
    assert out.components["acc"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(out.total, torch.tensor([1.0 - 0.5 * len(T + r"\boxed{1}") / 100, -0.5 * 0.01]))


def test_row_fields_reach_the_functions():
    seen = {}

    def fn(completions, answers, source, **fields):
        seen["source"] = source
        return [0.0] * len(completions)

    WeightedReward([("fn", fn, 1.0)])(["a", "b"], ["1", "2"], source=["geo", "chart"])
    assert seen["source"] == ["geo", "chart"]


def test_load_reward_function_by_import_path():
    assert load_reward_function("durian_lightning.core.rewards:format_reward") is format_reward
    assert load_reward_function("durian_lightning.core.rewards.accuracy_reward") is accuracy_reward
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_reward_function("no_such_module:fn")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_function("durian_lightning.core.rewards:nope")
    with pytest.raises(ValueError, match="import path"):
        load_reward_function("justaname")


@pytest.mark.parametrize(
    "fn, error, message",
    [
        (lambda c, a, **k: 1 / 0, RuntimeError, "reward function 'bad' raised ZeroDivisionError"),
        (lambda c, a, **k: [1.0], ValueError, "returned 1 scores for 2 completions"),
        (lambda c, a, **k: [1.0, float("nan")], ValueError, "returned nan for completion 1"),
        (lambda c, a, **k: [1.0, "high"], ValueError, "returned 'high' for completion 1"),
        (lambda c, a, **k: 3.0, ValueError, "must return a list of floats"),
    ],
)
def test_a_broken_reward_function_is_named_in_the_error(fn, error, message):
    with pytest.raises(error, match=message):
        WeightedReward([("bad", fn, 1.0)])(["a", "b"], ["1", "2"])


def test_weighted_reward_bad_configuration():
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward([])
    with pytest.raises(ValueError, match="unique"):
        WeightedReward([("a", format_reward, 1.0), ("a", accuracy_reward, 1.0)])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        WeightedReward.paper_default()(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="row field 'source' has 1 entries"):
        WeightedReward.paper_default()(["a", "b"], ["1", "2"], source=["x"])


def test_answer_prior_by_hand():
    from durian_lightning.stages.answer_prior import answer_prior_accuracy, most_frequent_answers

    train = [("count", "1"), ("count", "1"), ("count", "2"), ("color", "red"), ("color", "Blue"), ("color", "blue"),
             ("sum", "3"), ("sum", "4")]  # sum: a tie, the answer seen first wins
    prior = most_frequent_answers(train)
    assert prior == {"count": "1", "color": "Blue", "sum": "3"}  # "Blue" and "blue" are one answer, seen as "Blue"
    evaluated = [("count", "1"), ("count", "2"), ("count", "1.0"), ("color", "blue"), ("sum", "4"), ("total", "5")]
    accuracy = answer_prior_accuracy(prior, evaluated)
    # count: 1 right, 2 wrong, 1.0 right (numerically equal) -> 2/3; color 1/1; sum 0/1; total never seen -> 0/1
    assert accuracy == pytest.approx({"count": 2 / 3, "color": 1.0, "sum": 0.0, "total": 0.0, "overall": 3 / 6})
    assert answer_prior_accuracy(prior, []) == {}
    # data without a question-type column: one type, the most frequent answer overall
    assert most_frequent_answers([("", "a"), ("", "b"), ("", "b")]) == {"": "b"}


def test_on_error_zero_scores_only_the_failing_completions_zero_and_names_them():
    def picky(completions, answers, **fields):  # fails on the whole batch when any completion says "boom"
        if any("boom" in c for c in completions):
            raise KeyError("boom")
        return [1.0 if c == a else 0.5 for c, a in zip(completions, answers)]

    def half_nan(completions, answers, **fields):
        return [float("nan") if c == "x" else 1.0 for c in completions]

    reward = WeightedReward([("picky", picky, 1.0), ("nan", half_nan, 2.0)], on_error="zero")
    scores = reward(["1", "boom", "x"], ["1", "2", "3"], sample_ids=["a", "b", "c"])
    assert scores.components["picky"].tolist() == [1.0, 0.0, 0.5]  # retried one by one: only "boom" fails
    assert scores.components["nan"].tolist() == [1.0, 1.0, 0.0]
    assert scores.total.tolist() == [3.0, 2.0, 0.5]
    assert len(scores.failures) == 2
    assert "'picky' raised KeyError" in scores.failures[0] and "sample 'b'" in scores.failures[0]
    assert "'nan' returned nan" in scores.failures[1] and "sample 'c'" in scores.failures[1]
    # the default stops at the first failure, naming it
    with pytest.raises(RewardError, match="'picky' raised KeyError"):
        WeightedReward([("picky", picky, 1.0)])(["1", "boom"], ["1", "2"], sample_ids=["a", "b"])
    with pytest.raises(ValueError, match="on_error"):
        WeightedReward([("picky", picky, 1.0)], on_error="ignore")
