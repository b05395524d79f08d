r"""Verifiable rewards: answer extraction, format and accuracy checks, and the reward-function interface.

The paper's reward is ``0.1 * format + 0.9 * accuracy`` with the reasoning in ``<think>...</think>`` and the final
answer in ``\boxed{...}``. A reward function is any callable

    fn(completions: list[str], answers: list[str], **row_fields) -> list[float]

(one score per completion; ``row_fields`` are the other dataset columns, one entry per completion), so a user's
function plugs in by import path (:func:`load_reward_function`) and several combine with weights
(:class:`WeightedReward`), which also checks what each function returns.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Protocol, Sequence

import torch

try:  # symbolic equivalence (2\sqrt{3} == \sqrt{12}); optional, the `math` extra installs it
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # pragma: no cover - exercised only where the extra is absent
    _mv_parse = _mv_verify = None

HAS_MATH_VERIFY = _mv_parse is not None


class RewardFunction(Protocol):
    def __call__(self, completions: list[str], answers: list[str], **row_fields) -> list[float]: ...


# ----------------------------------------------------------------------------------------------------------------
# Extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), nested braces included; None if there is none.

    If the last box is never closed (a completion cut off at the token limit), the result is None: its final answer
    is incomplete, and an earlier box was not the final answer.
    """
    last = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if last < 0:
        return None
    i = text.find("{", last)
    if i < 0 or text[last:i].strip() not in _BOX_COMMANDS:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``; None if there is none."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def extract_answer(text: str) -> str | None:
    r"""The final answer: the last ``\boxed{}`` if any (also inside ``<answer>``), else the last ``<answer>`` tag."""
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_answer_tag(text)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and equivalence

_WRAPPERS = re.compile(r"^(?:\$+|\\\(|\\\[)(.*?)(?:\$+|\\\)|\\\])$", re.DOTALL)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\\quad|\\qquad")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")


def normalize_answer(answer: str) -> str:
    r"""Canonical string form: no math delimiters, ``\text{}``, spacing commands, degree signs, trailing period,
    case or whitespace; ``\dfrac``/``\tfrac`` become ``\frac``."""
    s = answer.strip()
    match = _WRAPPERS.match(s)
    if match:
        s = match.group(1)
    s = _TEXT_COMMAND.sub(r"\1", s)
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).lower()
    return s.rstrip(".")


_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")


def parse_number(answer: str) -> Fraction | None:
    r"""Exact rational value of a plain numeric answer: ``3``, ``-0.5``, ``1,000``, ``3/4``, ``\frac{3}{4}``.

    Returns None for anything else (expressions, roots, letters), which is then left to the other checks.
    Decimals are parsed exactly (``0.1`` is 1/10), so ``1/2 == 0.5`` and ``3.0 == 3`` compare exactly.
    """
    s = normalize_answer(answer)
    frac = _FRAC.match(s)
    if frac:
        sign, num, den = frac.groups()
        s = f"{sign}{num}/{den}"
    if s.count("/") == 1:
        num, den = s.split("/")
        a, b = _plain_number(num), _plain_number(den)
        if a is None or b is None or b == 0:
            return None
        return a / b
    return _plain_number(s)


def _plain_number(s: str) -> Fraction | None:
    if not s or s in "+-." or not _NUMBER.match(s):
        return None
    return Fraction(s.replace(",", ""))


_CHOICE_GOLD = re.compile(r"^\(?([a-h])\)?$")
_CHOICE_PRED = re.compile(r"^(?:option|choice|answer)?\s*\(?([a-h])\)?(?:$|[.:)\s])", re.IGNORECASE)


def _choice_letter(answer: str, pattern: re.Pattern) -> str | None:
    text = answer.strip()
    match = _WRAPPERS.match(text)
    text = _TEXT_COMMAND.sub(r"\1", match.group(1) if match else text).strip()
    found = pattern.match(text.lower())
    return found.group(1) if found else None


@functools.lru_cache(maxsize=65536)
def _symbolic_equal(predicted: str, gold: str) -> bool:
    """math-verify's verdict, memoised: the G rollouts of a prompt repeat the same few answers, and parsing
    LaTeX with sympy costs milliseconds each (it was the largest share of a tiny-model step before caching)."""
    if not HAS_MATH_VERIFY:
        return False
    # math-verify's timeout uses SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = _mv_parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = _mv_parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(_mv_verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # a checker failure is a wrong answer, never a crashed training step
        return False


def answers_match(predicted: str | None, gold: str, symbolic: bool = True) -> bool:
    """Whether an extracted answer equals the ground truth, trying in turn:

    1. equal normalised strings;
    2. equal exact numeric values (``1/2`` == ``0.5``, ``3.0`` == ``3``, ``1,000`` == ``1000``);
    3. multiple choice: when the gold is a letter A-H, the prediction's leading letter (``(B)``, ``B.``, ``B) 12``);
    4. symbolic equivalence through math-verify, when installed and ``symbolic`` is True.
    """
    if predicted is None:
        return False
    if normalize_answer(predicted) == normalize_answer(gold):
        return True
    gold_number, predicted_number = parse_number(gold), parse_number(predicted)
    if gold_number is not None and predicted_number is not None:
        return gold_number == predicted_number
    gold_letter = _choice_letter(gold, _CHOICE_GOLD)
    if gold_letter is not None:
        return _choice_letter(predicted, _CHOICE_PRED) == gold_letter
    return symbolic and _symbolic_equal(predicted, gold)


# ----------------------------------------------------------------------------------------------------------------
# Reward functions

_THINK_THEN_ANSWER = re.compile(r"^\s*<think>(.+?)</think>(.*)$", re.DOTALL)


def is_well_formatted(completion: str) -> bool:
    r"""``<think>`` (non-empty reasoning) ``</think>`` at the start, once, followed by a complete ``\boxed{}``."""
    if completion.count("<think>") != 1 or completion.count("</think>") != 1:
        return False
    match = _THINK_THEN_ANSWER.match(completion)
    return bool(match) and bool(match.group(1).strip()) and extract_boxed(match.group(2)) is not None


def format_reward(completions: list[str], answers: list[str] | None = None, **row_fields) -> list[float]:
    """1.0 for a completion in the ``<think>...</think> ... \\boxed{answer}`` format, else 0.0."""
    return [1.0 if is_well_formatted(c) else 0.0 for c in completions]


def accuracy_reward(completions: list[str], answers: list[str], symbolic: bool = True, **row_fields) -> list[float]:
    """1.0 when the completion's final answer (:func:`extract_answer`) matches the ground truth, else 0.0."""
    return [1.0 if answers_match(extract_answer(c), str(a), symbolic) else 0.0 for c, a in zip(completions, answers)]


def load_reward_function(spec: str | Callable) -> Callable:
    """A reward function from an import path, ``"package.module:function"`` or ``"package.module.function"``."""
    if callable(spec):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must be an import path like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({error})") from error
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


@dataclass(frozen=True)
class RewardTerm:
    name: str
    function: Callable
    weight: float


@dataclass(frozen=True)
class RewardScores:
    """The weighted total per completion and each function's raw scores (for logging)."""

    total: torch.Tensor  # (N,) float32
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) float32
    failures: list[str] = field(default_factory=list)  # with on_error="zero": what failed, one message per score


ON_ERROR = ("stop", "zero")  # what a failing reward function does to the run: stop it, or score that completion 0


class RewardError(ValueError, RuntimeError):
    """A reward function raised or returned something that is not one finite number per completion."""


class WeightedReward:
    """``total = sum_k weight_k * fn_k(completions, answers, **row_fields)``, checking every function's output.

    A function that raises, returns the wrong number of scores, or a non-numeric / NaN / inf score is never trained
    on. ``on_error="stop"`` (default) raises :class:`RewardError` naming the function, the sample and the completion;
    ``"zero"`` scores just the failing completions 0 (a function that fails on the whole batch is retried one
    completion at a time to find them) and lists each failure in :attr:`RewardScores.failures`.
    """

    def __init__(self, terms: Sequence[tuple[str, str | Callable, float]], on_error: str = "stop"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        if not terms:
            raise ValueError("WeightedReward needs at least one (name, function, weight) term")
        self.terms = [RewardTerm(name, load_reward_function(fn), float(weight)) for name, fn, weight in terms]
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        for term in self.terms:
            if not math.isfinite(term.weight):
                raise ValueError(f"reward term {term.name!r} has weight {term.weight}; weights must be finite")

    @classmethod
    def paper_default(cls, format_weight: float = 0.1, accuracy_weight: float = 0.9, on_error: str = "stop") -> "WeightedReward":
        """The paper's ``0.1 * format + 0.9 * accuracy``."""
        return cls([("format", format_reward, format_weight), ("accuracy", accuracy_reward, accuracy_weight)], on_error)

    def __call__(
        self, completions: Sequence[str], answers: Sequence[str], sample_ids: Sequence[str] | None = None, **row_fields
    ) -> RewardScores:
        """``sample_ids`` (one per completion) only name the sample in error messages."""
        n = len(completions)
        if len(answers) != n:
            raise ValueError(f"got {n} completions but {len(answers)} answers")
        for key, values in row_fields.items():
            if len(values) != n:
                raise ValueError(f"row field {key!r} has {len(values)} entries for {n} completions")
        total = torch.zeros(n, dtype=torch.float32)
        components, failures = {}, []
        ids = list(sample_ids) if sample_ids is not None else None
        for term in self.terms:
            args = (term, list(completions), list(answers), row_fields, ids)
            try:
                scores = self._run(*args)
            except RewardError:
                if self.on_error == "stop":
                    raise
                scores = self._run_one_by_one(*args, failures)
            components[term.name] = scores
            total += term.weight * scores
        return RewardScores(total=total, components=components, failures=failures)

    @classmethod
    def _run_one_by_one(cls, term, completions, answers, row_fields, ids, failures: list[str]) -> torch.Tensor:
        """Each completion alone: a failing one scores 0 and its message joins ``failures``."""
        scores = []
        for i in range(len(completions)):
            fields = {key: [values[i]] for key, values in row_fields.items()}
            try:
                scores.append(float(cls._run(term, completions[i : i + 1], answers[i : i + 1], fields,
                                             None if ids is None else ids[i : i + 1])[0]))
            except RewardError as error:
                failures.append(str(error))
                scores.append(0.0)
        return torch.tensor(scores, dtype=torch.float32)

    @staticmethod
    def _run(term: RewardTerm, completions: list[str], answers: list[str], row_fields: dict, sample_ids=None) -> torch.Tensor:
        def which(i: int) -> str:
            sample = f" of sample {sample_ids[i]!r}" if sample_ids is not None else ""
            return f"completion {i}{sample} ({completions[i][:80]!r})"

        def batch() -> str:
            return f" on samples {sorted(set(sample_ids))[:5]}" if sample_ids is not None else ""

        try:
            raw = term.function(completions, answers, **row_fields)
        except Exception as error:
            if len(completions) == 1:
                raise RewardError(f"reward function {term.name!r} raised {type(error).__name__}: {error} for {which(0)}") from error
            raise RewardError(f"reward function {term.name!r} raised {type(error).__name__}: {error}{batch()}") from error
        try:
            raw = list(raw)
        except TypeError:
            raise RewardError(f"reward function {term.name!r} must return a list of floats, got {type(raw).__name__}") from None
        if len(raw) != len(completions):
            raise RewardError(
                f"reward function {term.name!r} returned {len(raw)} scores for {len(completions)} completions"
            )
        values = []
        for i, value in enumerate(raw):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RewardError(f"reward function {term.name!r} returned {value!r} for {which(i)}; expected a number") from None
            if not math.isfinite(value):
                raise RewardError(f"reward function {term.name!r} returned {value} for {which(i)}; expected a finite number")
            values.append(value)
        return torch.tensor(values, dtype=torch.float32)
