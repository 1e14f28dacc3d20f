"""Rewards for online RL: rule rewards, user functions and a trained reward model.

Every reward function has one signature::

    fn(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]

one float per completion (``prompts`` are the rendered prompt texts, ``references`` the records'
reference answers). Built-ins:

- :func:`exact_match`: 1 when the completion's final answer equals the reference (normalised);
- :func:`gsm8k`: 1 when the completion's final number equals the reference's (the number after
  ``####``, or the reference itself);
- :func:`format_reward`: 1 when the completion matches a regex (by default: it ends with an
  ``answer: ...`` line);
- :func:`length_penalty`: 0 up to a target length, then down to -1 (DAPO's overlong shaping).

:func:`combine_rewards` sums weighted rewards; :func:`load_reward_fn` resolves a built-in name,
``module:function`` or ``path/to/file.py:function``. A reward model trained by
``train.objective: reward`` scores completions through
:class:`tunelab.models.reward_scoring.RewardModelScorer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError, DataError, TrainingError

# The answer extraction must agree with what `tunelab eval` counts as right.
from tunelab.data.answers import ANSWER_PATTERN, extract_answer, extract_number

RewardFn = Callable[[list[str], list[str], list[str | None]], list[float]]

FINAL_ANSWER_LINE = r"(?i)(?:\A|\n)[ \t]*answer[ \t]*:[ \t]*\S[^\n]*\s*\Z"
"""The default format: the completion's last non-blank line is ``answer: <something>``."""


def _need_reference(reference: str | None, index: int, reward: str) -> str:
    if reference is None or not reference.strip():
        raise DataError(
            f"reward {reward}: sample {index} has no reference answer; every prompt record needs one "
            "(GSM8K: the 'answer' field) for this reward"
        )
    return reference


def exact_match(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the completion's final answer equals the reference, else 0.0.

    The final answer is the text of the last ``answer: ...`` line, or the whole text when there
    is none; both sides are lower-cased with whitespace, outer punctuation and thousands
    separators normalised (the rule of ``tunelab eval``'s ``exact_match``).

    Raises:
        DataError: a sample has no reference.
    """
    return [
        float(extract_answer(completion, ANSWER_PATTERN)
              == extract_answer(_need_reference(reference, i, "exact_match"), ANSWER_PATTERN))
        for i, (completion, reference) in enumerate(zip(completions, references, strict=True))
    ]


def gsm8k(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the completion's final number equals the reference's numerically, else 0.0.

    The reference's number is the one after ``####`` (a GSM8K solution), else the reference's
    number itself. The completion's is the number after ``####``, else the one on its last
    ``answer: N`` line, else its last number. ``1,000.0`` equals ``1000``.

    Raises:
        DataError: a sample has no reference, or a reference holds no number.
    """
    scores = []
    for i, (completion, reference) in enumerate(zip(completions, references, strict=True)):
        expected = extract_number(_need_reference(reference, i, "gsm8k"))
        if expected is None:
            raise DataError(f"reward gsm8k: the reference of sample {i} holds no number: {reference[:80]!r}")
        scores.append(float(extract_number(completion) == expected))
    return scores


def format_reward(pattern: str = FINAL_ANSWER_LINE) -> RewardFn:
    """A reward of 1.0 for completions in which ``re.search(pattern)`` finds a match, else 0.0.

    Raises:
        ConfigError: the pattern is not a valid regular expression.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"format reward: invalid regular expression {pattern!r}: {exc}") from None

    def format_(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
        return [float(compiled.search(completion) is not None) for completion in completions]

    format_.__name__ = "format"
    return format_


def length_penalty(target: int, buffer: int, count: Callable[[str], int] = len) -> RewardFn:
    """A penalty for completions longer than ``target``: 0 up to it, -1 from ``target + buffer``.

    In between it falls linearly (DAPO's soft overlong punishment, Yu et al. 2025, eq. 13, with
    ``L_max = target + buffer`` and ``L_cache = buffer``); ``buffer=0`` gives a hard -1.

    Args:
        target: the longest length that costs nothing.
        buffer: the length over which the penalty grows from 0 to -1.
        count: how to measure a completion (characters by default; pass
            ``lambda text: len(tokenizer.encode(text))`` for tokens).

    Raises:
        ConfigError: a negative target or buffer.
    """
    if target < 0 or buffer < 0:
        raise ConfigError(f"length penalty: target and buffer must be >= 0 (got {target} and {buffer})")

    def penalty(length: int) -> float:
        over = length - target
        if over <= 0:
            return 0.0
        if over >= buffer:
            return -1.0
        return -over / buffer

    def length_penalty_(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
        return [penalty(count(completion)) for completion in completions]

    length_penalty_.__name__ = "length_penalty"
    return length_penalty_


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "gsm8k": gsm8k,
    "format": format_reward(),
}
"""Built-in rewards that need no options, by the name ``reward_fn`` (of an online objective's section) may give."""


def check_rewards(values: Any, expected: int, name: str) -> list[float]:
    """A reward function's result as floats, after checking it holds one finite number per completion.

    Raises:
        TrainingError: the result is not a sequence, has the wrong length, or holds a value that
            is not a finite number.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__len__"):
        raise TrainingError(f"reward function {name} returned {type(values).__name__}; "
                            "it must return a list with one float per completion")
    if len(values) != expected:
        raise TrainingError(f"reward function {name} returned {len(values)} values for {expected} completions; "
                            "it must return one float per completion, in order")
    floats = []
    for i, value in enumerate(values):
        number = None
        if not isinstance(value, str | bytes) and value is not None:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
        if number is None or not math.isfinite(number):
            raise TrainingError(f"reward function {name} returned {value!r} for completion {i}; "
                                "every reward must be a finite number")
        floats.append(number)
    return floats


class CheckedReward:
    """A reward function whose every result is checked (see :func:`check_rewards`)."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
        """Call the function; exceptions it raises propagate with their traceback."""
        return check_rewards(self.fn(prompts, completions, references), len(completions), self.name)


class CombinedReward:
    """A weighted sum of rewards: ``sum(weight * reward)``.

    Args:
        parts: name -> (reward function, weight).
    """

    def __init__(self, parts: Mapping[str, tuple[RewardFn, float]]) -> None:
        if not parts:
            raise ConfigError("a combined reward needs at least one reward function")
        self.parts = dict(parts)

    def components(
        self, prompts: list[str], completions: list[str], references: list[str | None]
    ) -> dict[str, list[float]]:
        """Each part's (unweighted, checked) rewards, for logging ``reward/<name>``."""
        return {
            name: check_rewards(fn(prompts, completions, references), len(completions), name)
            for name, (fn, _) in self.parts.items()
        }

    def __call__(self, prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
        """The weighted sum of the parts' rewards."""
        return self.combine(self.components(prompts, completions, references))

    def combine(self, components: Mapping[str, list[float]]) -> list[float]:
        """The weighted sum of rewards already computed by :meth:`components`."""
        columns = [[weight * value for value in components[name]] for name, (_, weight) in self.parts.items()]
        return [sum(values) for values in zip(*columns, strict=True)]


def combine_rewards(parts: Mapping[str, tuple[RewardFn, float]]) -> CombinedReward:
    """Sum weighted rewards, e.g. ``{"gsm8k": (gsm8k, 1.0), "format": (format_reward(), 0.2)}``."""
    return CombinedReward(parts)


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"reward_fn {spec}: no such file {path}")
    module_name = f"tunelab_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward_fn {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise ConfigError(f"reward_fn {spec}: {path}, line {exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of user code at import is reported as a config problem
        del sys.modules[module_name]
        raise ConfigError(f"reward_fn {spec}: importing {path} raised {type(exc).__name__}: {exc}") from None
    return module


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ConfigError(
                f"reward_fn {spec}: no module named {name!r}; install it, add its folder to PYTHONPATH, "
                "or give a file: path/to/rewards.py:function"
            ) from None
        raise ConfigError(f"reward_fn {spec}: importing {name} failed: {exc}") from None
    except SyntaxError as exc:
        raise ConfigError(f"reward_fn {spec}: {exc.filename}, line {exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of user code at import is reported as a config problem
        raise ConfigError(f"reward_fn {spec}: importing {name} raised {type(exc).__name__}: {exc}") from None


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function ``spec`` names, wrapped so that its results are checked.

    Args:
        spec: a built-in name (``exact_match``, ``gsm8k``, ``format``), ``module:function`` (an
            importable module) or ``path/to/file.py:function``.

    Returns:
        A callable with the reward signature; a result with the wrong length or a value that is
        not a finite number raises :class:`~tunelab.errors.TrainingError` naming ``spec``.

    Raises:
        ConfigError: unknown name, missing module/file/function, an import that fails, or an
            attribute that is not callable.
    """
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise ConfigError(
            f"reward_fn {spec}: not a built-in reward ({', '.join(BUILTIN_REWARDS)}) and not "
            "module:function or path/to/file.py:function"
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target).expanduser(), spec)
        where = str(target)
    else:
        module = _import_module(target, spec)
        where = f"module {target}"
    if not hasattr(module, attribute):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        hint = f" (it defines: {', '.join(defined)})" if defined else ""
        raise ConfigError(f"reward_fn {spec}: {where} has no function {attribute!r}{hint}")
    fn = getattr(module, attribute)
    if not callable(fn):
        raise ConfigError(f"reward_fn {spec}: {attribute} is a {type(fn).__name__}, not a function")
    return CheckedReward(fn, spec)
