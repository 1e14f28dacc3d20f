"""Chain-of-thought records from problems with worked solutions: ``tunelab data cot``.

A record becomes a user turn (the problem) and an assistant turn of numbered steps ending with
a final ``answer: X`` line, the line ``tunelab eval``'s default ``answer_pattern`` reads:

    1. Janet sells 16 - 3 - 4 = 9 duck eggs a day.
    2. She makes 9 * 2 = $18 every day at the farmer's market.
    answer: 18

Input layouts (``--format auto`` decides per record):

- ``gsm8k``: ``{"question", "answer"}`` where the answer is the solution, one step per line, with
  calculator annotations ``<<16-3-4=9>>`` and the final answer after ``####``. Annotations are
  removed (``calculator: strip``) or kept (``keep``); either way each is checked by evaluating
  it, and a record whose arithmetic is wrong is rejected with the offending annotation.
- ``steps``: a problem (``question``/``problem``/``prompt``), its steps (a list in
  ``steps``/``rationale``, or text with one step per line in ``solution``/``explanation``) and
  a final ``answer``.

:class:`CotBuilder` is a batched map function, so it also runs on a ``datasets.Dataset``.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.datatools.cached_map import batch_rows, columns, fingerprint, map_cached
from tunelab.datatools.convert import rejects_path_for, write_rejects
from tunelab.data.files import file_fingerprint, read_rows
from tunelab.datatools.jsonl_output import claim_job_outputs, provenance, write_jsonl
from tunelab.data.records import LoadReport
from tunelab.errors import DataError, TunelabError

CotFormat = Literal["auto", "gsm8k", "steps"]
Calculator = Literal["strip", "keep"]
CALCULATOR = re.compile(r"<<([^<>]*)>>")
LIST_MARKER = re.compile(r"^\s*(?:step\s*\d+\s*[:.)]|\d+\s*[.)]|[-*•])\s+", re.IGNORECASE)
QUESTION_KEYS = ("question", "problem", "prompt", "query")
STEP_LIST_KEYS = ("steps", "rationale", "reasoning")
STEP_TEXT_KEYS = ("solution", "explanation", "rationale", "reasoning")
ANSWER_KEYS = ("answer", "final_answer", "target")
_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def evaluate_arithmetic(expression: str) -> float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses) without ``eval``.

    Raises:
        ValueError: anything else (names, calls, huge powers).
    """
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    cleaned = expression.replace(",", "").replace("$", "").replace("x", "*").replace("×", "*").replace("÷", "/")
    cleaned = re.sub(r"(\d)\s*%", r"(\1/100)", cleaned)
    try:
        return float(value(ast.parse(cleaned.strip(), mode="eval").body))
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def check_annotation(annotation: str) -> str | None:
    """Why a calculator annotation ``expr=result`` is wrong, or None when it holds (or cannot be read).

    The result may be rounded as printed: ``10/3=3.33`` holds.
    """
    if "=" not in annotation:
        return None
    expression, _, stated = annotation.rpartition("=")
    try:
        expected = evaluate_arithmetic(stated)
        actual = evaluate_arithmetic(expression)
    except ValueError:
        return None  # not plain arithmetic (units, variables): nothing to check
    decimals = len(stated.strip().partition(".")[2]) if "." in stated else 0
    tolerance = max(0.5 * 10 ** -decimals, 1e-6 * abs(expected)) + 1e-9
    if abs(actual - expected) <= tolerance:
        return None
    return f"calculator annotation <<{annotation}>> is wrong: {expression.strip()} = {actual:g}"


def normalize_answer(answer: str) -> str:
    """A final answer as written on the ``answer:`` line: trimmed, thousands separators removed from numbers."""
    answer = answer.strip().rstrip(".")
    if re.fullmatch(r"[-+]?\$?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer


def _first(raw: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if raw.get(key) not in (None, "", []):
            return raw[key]
    return None


@dataclass
class CotOptions:
    """How chain-of-thought records are written.

    Attributes:
        fmt: input layout (``auto``, ``gsm8k``, ``steps``).
        calculator: ``strip`` or ``keep`` GSM8K's ``<<...>>`` annotations.
        check_arithmetic: reject GSM8K records whose annotations do not hold.
        step_format: how a step is written (``{n}`` its number, ``{step}`` its text).
        answer_format: the final line (``{answer}``).
        system: a system prompt for every record (None: none).
        kind: ``conversation`` (train) or ``prompt`` (eval/RL: the final answer is the reference).
    """

    fmt: CotFormat = "auto"
    calculator: Calculator = "strip"
    check_arithmetic: bool = True
    step_format: str = "{n}. {step}"
    answer_format: str = "answer: {answer}"
    system: str | None = None
    kind: Literal["conversation", "prompt"] = "conversation"

    def check(self) -> None:
        """Raise :class:`TunelabError` for formats that lack their placeholders."""
        if "{step}" not in self.step_format:
            raise TunelabError(f"--step-format {self.step_format!r} must contain {{step}} (and usually {{n}})")
        if "{answer}" not in self.answer_format:
            raise TunelabError(f"--answer-format {self.answer_format!r} must contain {{answer}}")


class CotBuilder:
    """The batched map function: raw problems -> chain-of-thought records.

    Output columns: ``record`` (canonical JSON text, empty on error), ``error`` and ``source``.
    """

    def __init__(self, options: CotOptions) -> None:
        options.check()
        self.options = options

    def parse(self, raw: Any) -> tuple[str, list[str], str, str]:
        """Question, steps, final answer and the layout it was read as.

        Raises:
            DataError: a field is missing, there are no steps, or (GSM8K) the arithmetic is wrong.
        """
        if not isinstance(raw, dict):
            raise DataError(f"expected an object with a question and a solution, got {type(raw).__name__}")
        question = _first(raw, QUESTION_KEYS)
        if not isinstance(question, str):
            raise DataError(f"no question (tried keys {list(QUESTION_KEYS)})")
        fmt = self.options.fmt
        if fmt == "auto":
            answer = raw.get("answer")
            gsm8k = isinstance(answer, str) and "####" in answer and not _first(raw, STEP_LIST_KEYS)
            fmt = "gsm8k" if gsm8k else "steps"
        if fmt == "gsm8k":
            steps, answer = self._gsm8k(raw)
        else:
            steps, answer = self._steps(raw)
        steps = [LIST_MARKER.sub("", step).strip() for step in steps]
        steps = [step for step in steps if step]
        if not steps:
            raise DataError("the solution has no steps")
        return question.strip(), steps, normalize_answer(answer), fmt

    def _gsm8k(self, raw: dict[str, Any]) -> tuple[list[str], str]:
        solution = raw.get("answer")
        if not isinstance(solution, str) or "####" not in solution:
            raise DataError("GSM8K 'answer' must hold the solution and '#### <final answer>'")
        body, _, final = solution.rpartition("####")
        if not final.strip():
            raise DataError("nothing after '####' (the final answer)")
        if self.options.check_arithmetic:
            for annotation in CALCULATOR.findall(body):
                problem = check_annotation(annotation)
                if problem:
                    raise DataError(problem)
        if self.options.calculator == "strip":
            body = CALCULATOR.sub("", body)
        return body.strip().split("\n"), final.strip()

    def _steps(self, raw: dict[str, Any]) -> tuple[list[str], str]:
        listed = _first(raw, STEP_LIST_KEYS)
        if isinstance(listed, list):
            if not all(isinstance(step, str) for step in listed):
                raise DataError("'steps' must be a list of strings")
            steps = listed
        else:
            text = _first(raw, STEP_TEXT_KEYS)
            if not isinstance(text, str):
                raise DataError(f"no solution steps (tried keys {list(STEP_LIST_KEYS + STEP_TEXT_KEYS)})")
            steps = text.strip().split("\n")
        answer = _first(raw, ANSWER_KEYS)
        if answer is None or isinstance(answer, dict | list):
            raise DataError(f"no final answer (tried keys {list(ANSWER_KEYS)})")
        return steps, str(answer)

    def record(self, raw: Any, source: str) -> dict[str, Any]:
        """One chain-of-thought record (canonical JSON with ``provenance``) from one raw problem.

        Raises:
            DataError: see :meth:`parse`.
        """
        question, steps, answer, fmt = self.parse(raw)
        options = self.options
        lines = [options.step_format.format(n=n, step=step) for n, step in enumerate(steps, start=1)]
        final = options.answer_format.format(answer=answer)
        messages = [{"role": "system", "content": options.system}] if options.system else []
        messages.append({"role": "user", "content": question})
        details = {"format": fmt, "calculator": options.calculator if fmt == "gsm8k" else None, "steps": len(steps)}
        if options.kind == "prompt":
            record: dict[str, Any] = {"messages": messages, "reference": answer}
        else:
            record = {"messages": messages + [{"role": "assistant", "content": "\n".join(lines + [final])}]}
        record["provenance"] = provenance("cot", source, **details)
        return record

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        """Map a batch: ``raw`` (JSON text) and ``source`` columns, or a dataset's own columns."""
        rows, sources = batch_rows(batch, indices)
        out: dict[str, list] = {"record": [], "error": [], "source": []}
        for raw, source in zip(rows, sources):
            try:
                out["record"].append(json.dumps(self.record(raw, source), ensure_ascii=False))
                out["error"].append("")
            except DataError as exc:
                out["record"].append("")
                out["error"].append(str(exc))
            out["source"].append(source)
        return out


@dataclass
class CotResult:
    """What ``cot`` wrote and what it rejected."""

    written: int
    report: LoadReport
    out: Path
    rejects_path: Path | None


def cot_files(
    files: list[str],
    out: str | Path,
    options: CotOptions | None = None,
    *,
    limit: int | None = None,
    num_proc: int | None = None,
    use_cache: bool = True,
    rejects_path: str | Path | None = None,
    overwrite: bool = False,
) -> CotResult:
    """Write chain-of-thought records for the problems in ``files`` to canonical JSONL at ``out``.

    The options are checked first, then a missing input is named and ``out`` and the rejects file
    (default ``<out stem>.rejects.jsonl``) are claimed (existing ones refused unless ``overwrite``,
    an input always), then the work starts.

    Raises:
        DataError: a missing or unreadable input, or no usable problem.
        TunelabError: invalid options.
        OutputError: an output exists (without ``overwrite``) or is an input.
    """
    options = options or CotOptions()
    builder = CotBuilder(options)
    files = list(files)
    claim_job_outputs(files, [out, rejects_path_for(out, rejects_path)], overwrite)
    report = LoadReport()
    rejects: list[dict[str, Any]] = []
    rows = []
    for name in files:
        for row in read_rows(name):
            if limit is not None and len(rows) >= limit:
                break
            report.read += 1
            if row.error is not None:
                report.skip(row.error, row.source)
                rejects.append({"source": row.source, "reason": row.error, "record": None})
                continue
            rows.append({"raw": json.dumps(row.data, ensure_ascii=False), "source": row.source})
    if not rows:
        raise DataError(f"{', '.join(files)}: no readable records\n{report.summary()}".rstrip())
    key = fingerprint("cot", [file_fingerprint(f) for f in files], vars(options), limit)
    mapped = map_cached(rows, builder, key=key, desc="Writing chain-of-thought records", num_proc=num_proc,
                        use_cache=use_cache)
    records = []
    for index, (record, error, source) in enumerate(zip(*columns(mapped, "record", "error", "source"))):
        if error:
            report.skip(error if not error.startswith("calculator annotation") else
                        "calculator annotation is wrong", source)
            rejects.append({"source": source, "reason": error, "record": json.loads(rows[index]["raw"])})
        else:
            records.append(json.loads(record))
    report.kept = len(records)
    rejects_file = write_rejects(rejects, out, rejects_path)
    if not records:
        raise DataError(f"{', '.join(files)}: no usable problems:\n{report.summary()}")
    return CotResult(write_jsonl(out, records), report, Path(out), rejects_file)
