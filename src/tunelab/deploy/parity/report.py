"""The parity gate's table (rich) and its Markdown form for docs and benchmark results."""

from __future__ import annotations

from typing import Any

from tunelab.deploy.parity.gate import GateResult

HEADERS = ("model", "reader", "class", "prompt tokens", "max |Δlogit|", "top-1", "same answers", "same stop",
           "verdict")


def _row(c: dict[str, Any]) -> list[str]:
    """One table row of a comparison (as :meth:`Comparison.as_dict` gives it, or read back from a report)."""
    if c["skipped"]:
        return [c["name"], c["reader"], "-", "-", "-", "-", "-", "-", "skipped"]
    tokens = f"{c['prompt_tokens_equal']}/{c['prompt_tokens_checked']}" if c["prompt_tokens_checked"] else "n/a"
    logit = f"{c['max_abs_logit']:.2e}" if c["max_abs_logit"] is not None else "n/a"
    top1 = f"{c['top1']:.3f}" if c["top1"] is not None else "n/a"
    return [c["name"], c["reader"], c["klass"], tokens, logit, top1, f"{c['same_answers']}/{c['prompts']}",
            f"{c['same_stops']}/{c['prompts']}", "pass" if c["passed"] else "FAIL"]


def limits_line(comparisons: list[dict[str, Any]]) -> str:
    """The limits of each class in the table, in one line."""
    seen: dict[str, str] = {}
    for c in comparisons:
        limits = c["limits"]
        if limits is None or c["klass"] in seen:
            continue
        parts = []
        if limits["max_abs_logit"] is not None:
            parts.append(f"|Δlogit| ≤ {limits['max_abs_logit']:g}")
        if limits["min_top1"] is not None:
            parts.append(f"top-1 ≥ {limits['min_top1']:g}")
        parts += [f"answers ≥ {limits['min_answers']:g}", f"stops ≥ {limits['min_stops']:g}"]
        seen[c["klass"]] = f"{c['klass']}: {', '.join(parts)}"
    return "limits: " + "; ".join(seen.values())


def print_report(result: GateResult, console: Any = None) -> None:
    """The table, the limits it was judged by, then each failure, note, skip and first differing answer."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    table = Table(*HEADERS, title=f"parity with {result.reference}: {result.prompts} prompts, greedy, up to "
                                  f"{result.max_new_tokens} new tokens ({result.reference_stops} reference answers "
                                  "end with a stop token)")
    report = result.as_dict()
    for comparison in report["comparisons"]:
        table.add_row(*_row(comparison))
    console.print(table)
    console.print(limits_line(report["comparisons"]))
    for c in result.comparisons:
        if c.skipped:
            console.print(f"{c.name} ({c.reader}): skipped: {c.skipped}")
        for failure in c.failures:
            console.print(f"[red]{c.name} ({c.reader})[/]: {failure}")
        for note in c.notes:
            console.print(f"{c.name} ({c.reader}): note: {note}")
        if c.first_difference and not c.passed:
            d = c.first_difference
            console.print(f"{c.name}: first different answer, to {d['prompt'][:80]!r}:\n"
                          f"  reference: {d['reference'][:200]!r} (stop {d['reference_stop']})\n"
                          f"  {c.name}: {d['answer'][:200]!r} (stop {d['stop']})")
    console.print("parity: " + ("[green]pass[/]" if result.passed else "[red]FAIL[/]"))


def markdown_table(report: dict[str, Any]) -> str:
    """The table of a report (:meth:`GateResult.as_dict`, or the JSON of ``--report``) as Markdown."""
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _row(c)) + " |" for c in report["comparisons"]]
    return "\n".join(lines) + "\n\n" + limits_line(report["comparisons"])
