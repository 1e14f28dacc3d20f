"""Run the examples and print every number the README, docs and example files claim beside the measured one.

    python examples/check.py --list                  # the claims, and where each is stated
    python examples/check.py --all                   # every example over seeds 42, 0 and 1 (hours on 2 CPU cores)
    python examples/check.py grpo dpo --seeds 42     # some examples, one seed
    python examples/check.py --all --markdown docs/examples-check.md   # also write the table

Each example runs exactly as a user runs it (``tunelab train CONFIG``), with ``train.seed=S`` and
its own ``output_dir`` under ``runs/check/``; an example that starts from an earlier run
(``runs/quickstart/output/final``, ``runs/sft-short/final``) gets that run made first with its
documented command (seed 42, as shipped), so the seeds vary the example itself. Held-out exact
match of a policy is measured with ``tunelab eval`` on the 200 test problems. A claim is a range:
it holds when the mean over the seeds falls in it; the table shows every seed and the spread.
A finished run is reused: delete ``runs/check/NAME`` after changing an example.

On a busy machine, ``OMP_NUM_THREADS=1`` runs several times faster than two threads fighting for
two cores, with the same per-step losses (checked on sft-short's first 40 steps, to 4 digits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = Path("runs")
CHECK_RUNS = RUNS / "check"
TEST_PROBLEMS = "examples/data/arithmetic_test.jsonl"
DEFAULT_SEEDS = (42, 0, 1)


@dataclass(frozen=True)
class Claim:
    """A number an example's documentation states, and the range the measured mean must fall in."""

    metric: str  # a key of :func:`measure`'s result
    stated: str  # as written in the docs
    low: float
    high: float
    where: tuple[str, ...]  # files that state it (a test checks they contain ``stated``)


@dataclass(frozen=True)
class Example:
    """One example config: how it is run, what it needs first, what it claims."""

    name: str
    config: str
    needs: str | None = None  # the example whose shipped run this one starts from
    overrides: tuple[str, ...] = ()
    policy: bool = True  # a generative model: measure held-out exact match with tunelab eval
    claims: tuple[Claim, ...] = ()
    shipped_output: str | None = None  # where the documented command writes (for examples others need)

    def command(self, *extra: str) -> list[str]:
        """``tunelab train`` with this example's config and overrides."""
        return ["tunelab", "train", self.config, *self.overrides, *extra]


EXAMPLES: dict[str, Example] = {e.name: e for e in (
    Example("quickstart", "examples/quickstart.yaml", shipped_output="runs/quickstart/output", claims=(
        Claim("start/eval_loss", "6.251", 6.24, 6.26, ("README.md",)),
        Claim("final/eval_loss", "0.01807", 0.010, 0.030, ("README.md",)),
        Claim("final/eval_exact_match", "0.94", 0.85, 1.0, ("README.md",)),
        Claim("steps", "540 steps", 540, 540, ("README.md",)),
    )),
    Example("sft-short", "examples/sft-short.yaml", shipped_output="runs/sft-short", claims=(
        Claim("final/eval_exact_match", "0.33", 0.2, 0.45, ("examples/grpo.yaml", "docs/alignment.md")),
    )),
    Example("dpo", "examples/dpo.yaml", needs="quickstart", claims=(
        Claim("final/eval_rewards/accuracy", "0.85", 0.75, 1.0, ("examples/dpo.yaml",)),
    )),
    Example("simpo", "examples/simpo.yaml", needs="quickstart"),
    Example("orpo", "examples/orpo.yaml", needs="quickstart"),
    Example("kto", "examples/kto.yaml", needs="quickstart"),
    Example("reward", "examples/reward.yaml", needs="quickstart", policy=False, claims=(
        Claim("final/eval_rewards/accuracy", "0.9", 0.8, 1.0, ("examples/reward.yaml",)),
    )),
    Example("grpo", "examples/grpo.yaml", needs="sft-short", claims=(
        Claim("final/eval_reward", "0.38", 0.33, 0.5, ("examples/grpo.yaml", "docs/alignment.md")),
    )),
    Example("ppo", "examples/ppo.yaml", needs="sft-short"),
)}


# ---------------------------------------------------------------------------------------------
# Running


def tunelab(command: list[str], log: Path) -> None:
    """Run a tunelab command (``tunelab`` as installed), its output appended to ``log``; stop on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNELAB_REGISTRY": str(CHECK_RUNS / "runs.db")}
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "tunelab", *command[1:]], stdout=handle, stderr=subprocess.STDOUT,
                              cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)} (exit {done.returncode}; see {log})")


def ensure_shipped(name: str) -> Path:
    """The shipped run of an example others start from, made with its documented command when missing."""
    example = EXAMPLES[name]
    output = REPO / example.shipped_output
    if not (output / "final").is_dir():
        print(f"making {example.shipped_output}: {' '.join(example.command())}", flush=True)
        tunelab(example.command("--overwrite"), CHECK_RUNS / "logs" / f"{name}-shipped.log")
    return output


def eval_exact_match(model_dir: Path, out: Path, log: Path) -> float:
    """Held-out exact match of a model on the 200 test problems (``tunelab eval``, greedy); cached in ``out``."""
    results = out / "results.json"
    if not results.is_file():
        tunelab(["tunelab", "eval", "--model", str(model_dir), "--data", TEST_PROBLEMS, "--metrics", "exact_match",
                 "--max-new-tokens", "16", "--out", str(out)], log)
    return json.loads(results.read_text())["metrics"]["exact_match"]


def read_metrics(run_dir: Path) -> dict[str, float]:
    """``start/<eval metric>`` (first evaluation), ``final/<eval metric>`` (last), steps and train seconds."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row for row in rows if any(key.startswith("eval_") for key in row)]
    found: dict[str, float] = {}
    for prefix, row in (("start", evals[0] if evals else {}), ("final", evals[-1] if evals else {})):
        found.update({f"{prefix}/{k}": v for k, v in row.items() if k.startswith("eval_")})
    if len(evals) > 1:
        found.update({f"change/{k}": evals[-1][k] - v for k, v in evals[0].items() if k in evals[-1] and
                      k.startswith("eval_")})
    info = json.loads((run_dir / "run.json").read_text())
    found["steps"] = info["steps"]
    found["train_seconds"] = info["train_seconds"]
    return found


def measure(name: str, seed: int) -> dict[str, float]:
    """Run one example with one seed (reusing a finished run) and return its numbers."""
    example = EXAMPLES[name]
    if example.needs:
        ensure_shipped(example.needs)
    run_dir = CHECK_RUNS / name / f"seed-{seed}"
    log = CHECK_RUNS / "logs" / f"{name}-seed-{seed}.log"
    if not (REPO / run_dir / "run.json").is_file():
        started = time.time()
        print(f"running {name} seed {seed}: {' '.join(example.command(f'train.seed={seed}'))}", flush=True)
        tunelab(example.command(f"train.seed={seed}", f"output_dir={run_dir}", "--overwrite"), log)
        print(f"  {time.time() - started:.0f} s", flush=True)
    found = read_metrics(REPO / run_dir)
    if example.policy:
        found["exact_match_test/after"] = eval_exact_match(run_dir / "final", run_dir / "eval-test", log)
        if example.needs:
            base = REPO / EXAMPLES[example.needs].shipped_output
            found["exact_match_test/before"] = eval_exact_match(base / "final", base / "eval-test", log)
            found["exact_match_test/change"] = found["exact_match_test/after"] - found["exact_match_test/before"]
    return found


# ---------------------------------------------------------------------------------------------
# Reporting


def spread(values: list[float]) -> str:
    """Mean and range of the seeds' values."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ({min(values):.4g}–{max(values):.4g})"


def table(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> tuple[str, bool]:
    """A Markdown table of claimed versus measured numbers, and whether every claim holds."""
    lines = [f"| example | number | claimed | {' | '.join(f'seed {s}' for s in seeds)} | mean (min–max) | holds |",
             f"|---|---|---|{'---:|' * len(seeds)}---:|---|"]
    all_hold = True
    for name, by_seed in results.items():
        claims = {c.metric: c for c in EXAMPLES[name].claims}
        metrics = sorted({m for found in by_seed.values() for m in found}, key=lambda m: (m not in claims, m))
        for metric in metrics:
            values = [by_seed[s][metric] for s in seeds if metric in by_seed.get(s, {})]
            if not values or (metric not in claims and not _worth_showing(metric)):
                continue
            claim = claims.get(metric)
            holds = ""
            if claim is not None:
                ok = claim.low <= statistics.mean(values) <= claim.high
                all_hold &= ok
                holds = "yes" if ok else f"**NO** (claim range {claim.low:g}–{claim.high:g})"
            cells = [f"{by_seed[s][metric]:.4g}" if metric in by_seed.get(s, {}) else "" for s in seeds]
            lines.append(f"| {name} | {metric} | {claim.stated if claim else ''} | {' | '.join(cells)} | "
                         f"{spread(values)} | {holds} |")
    return "\n".join(lines), all_hold


def _worth_showing(metric: str) -> bool:
    keep = ("eval_exact_match", "eval_reward", "eval_rewards/accuracy", "eval_loss", "exact_match_test", "steps",
            "train_seconds")
    return any(part in metric for part in keep) and "eval_reward/" not in metric


def main(argv: list[str] | None = None, run: Callable[[str, int], dict[str, float]] = measure) -> int:
    """Run the chosen examples over the seeds; print the table; exit 1 when a claim does not hold."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("examples", nargs="*", help=f"examples to run: {', '.join(EXAMPLES)}")
    parser.add_argument("--all", action="store_true", help="run every example")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated train.seed values")
    parser.add_argument("--list", action="store_true", help="print the claims and where they are stated")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", default=str(CHECK_RUNS / "results.json"), help="all measured numbers (JSON)")
    args = parser.parse_args(argv)
    if args.list:
        for example in EXAMPLES.values():
            for claim in example.claims:
                print(f"{example.name:10s} {claim.metric:28s} {claim.stated:10s} [{claim.low:g}, {claim.high:g}]  "
                      f"{', '.join(claim.where)}")
        return 0
    names = list(EXAMPLES) if args.all else args.examples
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown or not names:
        parser.error(f"choose examples from {', '.join(EXAMPLES)} (or --all); unknown: {unknown}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {name: {seed: run(name, seed) for seed in seeds} for name in names}
    text, all_hold = table(results, seeds)
    print(text)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({n: {str(s): v for s, v in r.items()} for n, r in results.items()}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0 if all_hold else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
