"""Run the examples and print every number the README, docs and example files claim beside the measured one.

    python examples/check.py --list                  # the claims, and where each is stated
    python examples/check.py --all                   # every example over seeds 42, 0 and 1 (hours on 2 CPU cores)
    python examples/check.py grpo dpo --seeds 42     # some examples, one seed
    python examples/check.py --all --markdown docs/examples.md       # also write the table (between its markers)

Each example runs exactly as a user runs it (``tunelab train CONFIG``), with ``train.seed=S`` and
its own ``output_dir`` under ``runs/check/``; an example that starts from an earlier run
(``runs/quickstart/output/final``, ``runs/sft-short/final``) gets that run made first with its
documented command (seed 42, as shipped), so the seeds vary the example itself. Held-out exact
match of a policy is measured with ``tunelab eval`` on the 200 test problems. A claim is the
text a file states and the range it means: it holds when every seed it speaks of falls in the
range (a claim about one run's output line names its seed); the table shows every seed and the
spread. Variants (other overrides on the same config) are the recipes as they were before.
A finished run is reused while its saved config equals the example's; a run made by an older
recipe is made again.

To run several examples at once on a small machine (one ``check.py`` process each, with its own
``--json``), give each ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
    """A number an example's documentation states, and the range every measured seed must fall in."""

    metric: str  # a key of :func:`measure`'s result
    stated: str  # as written in the docs
    low: float  # the range the stated text means (a rounded number covers its rounding interval)
    high: float
    where: tuple[str, ...]  # files that state it (a test checks they contain ``stated``)
    seeds: tuple[int, ...] = ()  # the seeds it speaks of (a line of one run's output); empty: every seed

    def about(self, seed: int) -> bool:
        """Whether this claim speaks of ``seed``."""
        return not self.seeds or seed in self.seeds

    def holds_for(self, value: float) -> bool:
        """Whether one measured value is in the claimed range (to rounding: 0.03 is 0.030000000000000027)."""
        return self.low - 1e-9 <= value <= self.high + 1e-9


@dataclass(frozen=True)
class Example:
    """One example config (or a variant of one: other overrides): how it is run, what it needs first, what it claims."""

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


README, ALIGNMENT, EXAMPLES_DOC = "README.md", "docs/alignment.md", "docs/examples.md"

# The variants (dpo-plain, reward-1k, grpo-lora, ppo-lr2e-3) are the recipes as they were before
# (what did not deliver); docs/examples.md quotes them beside the recipes that replaced them.
EXAMPLES: dict[str, Example] = {e.name: e for e in (
    Example("quickstart", "examples/quickstart.yaml", shipped_output="runs/quickstart/output", claims=(
        Claim("steps", "540 steps", 540, 540, (README,), seeds=(42,)),
        Claim("start/eval_loss", "eval_loss 6.251", 6.2505, 6.2515, (README,)),
        Claim("final/eval_loss", "-> 0.0231", 0.02305, 0.02315, (README,), seeds=(42,)),
        Claim("start/eval_ppl", "eval_ppl 518.6", 518.55, 518.65, (README,)),
        Claim("final/eval_ppl", "-> 1.023", 1.0225, 1.0235, (README,), seeds=(42,)),
        Claim("final/eval_exact_match", "eval_exact_match 0 -> 0.89", 0.89, 0.89, (README,), seeds=(42,)),
        Claim("final/eval_exact_match", "0.89, 0.79 and 0.91", 0.79, 0.91, (README, EXAMPLES_DOC)),
        Claim("final/eval_loss", "final eval_loss 0.023 to 0.044", 0.0225, 0.0445, (README,)),
        Claim("train_seconds", "4 to 10 minutes of training", 240, 600, (README, EXAMPLES_DOC)),
        Claim("exact_match_test/after", "0.89 of the held-out problems right", 0.89, 0.89, (ALIGNMENT,), seeds=(42,)),
    )),
    Example("sft-short", "examples/sft-short.yaml", shipped_output="runs/sft-short", claims=(
        Claim("final/eval_exact_match", "about a third", 0.25, 0.42,
              ("examples/grpo.yaml", "examples/ppo.yaml", ALIGNMENT)),
    )),
    Example("dpo", "examples/dpo.yaml", needs="quickstart", claims=(
        Claim("start/eval_rewards/accuracy", "accuracy 0 ->", 0.0, 0.0, (EXAMPLES_DOC,)),
        Claim("final/eval_rewards/accuracy", "0.79 to 0.85 of the held-out pairs", 0.79, 0.85, (EXAMPLES_DOC,)),
        Claim("exact_match_test/change", "by 0 to -0.03", -0.03, 0.0, ("examples/dpo.yaml", ALIGNMENT, EXAMPLES_DOC)),
        Claim("start/eval_logps/chosen", "from -0.31", -0.315, -0.305, (EXAMPLES_DOC,)),
        Claim("final/eval_logps/chosen", "-0.33 to -0.36 with it", -0.365, -0.325, (EXAMPLES_DOC,)),
    )),
    Example("dpo-plain", "examples/dpo.yaml", needs="quickstart", overrides=("dpo.rpo_alpha=0",), claims=(
        Claim("exact_match_test/change", "fell by 0.045 to 0.065", -0.065, -0.045,
              ("examples/dpo.yaml", ALIGNMENT, EXAMPLES_DOC)),
        Claim("final/eval_logps/chosen", "-0.59 to -0.70 without", -0.705, -0.585, (EXAMPLES_DOC,)),
    )),
    Example("simpo", "examples/simpo.yaml", needs="quickstart", claims=(
        Claim("exact_match_test/change", "SimPO by 0.04 to 0.065", -0.065, -0.04, (EXAMPLES_DOC,)),
    )),
    Example("orpo", "examples/orpo.yaml", needs="quickstart", claims=(
        Claim("exact_match_test/change", "ORPO moves it by -0.04 to +0.005", -0.04, 0.005, (EXAMPLES_DOC,)),
    )),
    Example("kto", "examples/kto.yaml", needs="quickstart", claims=(
        Claim("exact_match_test/change", "KTO by 0.05 to 0.08", -0.08, -0.05, (EXAMPLES_DOC,)),
    )),
    Example("reward", "examples/reward.yaml", needs="quickstart", policy=False, claims=(
        Claim("final/eval_rewards/accuracy", "0.85 to 0.92", 0.85, 0.92, (EXAMPLES_DOC, "examples/reward.yaml")),
    )),
    Example("reward-1k", "examples/reward.yaml", needs="quickstart", policy=False, overrides=(
        "data.train=examples/data/arithmetic_prefs_train.jsonl", "train.epochs=2", "train.eval_every=50"), claims=(
        Claim("start/eval_rewards/accuracy", "0.39 to 0.49 with the untrained head", 0.39, 0.49, (EXAMPLES_DOC,)),
        Claim("final/eval_rewards/accuracy", "0.56 to 0.63", 0.56, 0.63, (EXAMPLES_DOC, "examples/reward.yaml")),
    )),
    Example("grpo", "examples/grpo.yaml", needs="sft-short", claims=(
        Claim("exact_match_test/change", "by +0.04 to +0.09", 0.04, 0.09,
              ("examples/grpo.yaml", ALIGNMENT, EXAMPLES_DOC)),
        Claim("exact_match_test/before", "from 0.31", 0.31, 0.31, (EXAMPLES_DOC, ALIGNMENT)),
        Claim("exact_match_test/after", "0.31 to 0.35-0.40", 0.35, 0.40, (EXAMPLES_DOC, ALIGNMENT)),
    )),
    Example("grpo-lora", "examples/grpo.yaml", needs="sft-short", overrides=(
        "method.type=lora", "method.rank=16", "train.max_steps=40", "train.lr=2e-3", "train.eval_every=20"), claims=(
        Claim("exact_match_test/change", "lowered it by 0.055 to 0.115", -0.115, -0.055,
              ("examples/grpo.yaml", ALIGNMENT, EXAMPLES_DOC)),
    )),
    Example("ppo", "examples/ppo.yaml", needs="sft-short", claims=(
        Claim("start/eval_reward", "eval_reward 0.30 ->", 0.3, 0.3, (ALIGNMENT,)),
        Claim("final/eval_reward", "eval_reward 0.30 -> 0.31 to 0.33", 0.31, 0.33, (ALIGNMENT,)),
        Claim("max/kl", "stays under 0.33", 0.0, 0.33, (EXAMPLES_DOC,)),
        Claim("exact_match_test/change", "-0.01 to +0.03", -0.01, 0.03, (EXAMPLES_DOC,)),
    )),
    Example("ppo-lr2e-3", "examples/ppo.yaml", needs="sft-short", overrides=("train.lr=2e-3",), claims=(
        Claim("max/kl", "peaked at 1.04 to 1.61", 1.035, 1.615, ("examples/ppo.yaml", ALIGNMENT)),
        Claim("change/eval_reward", "eval_reward fell by 0.02 to 0.09", -0.09, -0.02, (ALIGNMENT,)),
        Claim("exact_match_test/change", "by 0.055 to 0.105", -0.105, -0.055, ("examples/ppo.yaml", EXAMPLES_DOC)),
    )),
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


def made_by(run_dir: Path, example: Example, *extra: str) -> bool:
    """Whether ``run_dir`` holds a finished run of the example as it is now: its saved config equals the
    example's with ``extra`` overrides (``output_dir`` aside; a setting added since the run was made
    must have its default in the example)."""
    import yaml

    from tunelab.config import load_config

    if not (run_dir / "run.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    saved = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    wanted = flatten(load_config(REPO / example.config, [*example.overrides, *extra]).model_dump(mode="json"))
    for key in set(saved) | set(wanted):
        if key == "output_dir" or saved.get(key, _MISSING) == wanted.get(key, _MISSING):
            continue
        if key in saved or key not in wanted or schema_default(key) != wanted[key]:
            return False
    return True


_MISSING = object()


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"model": {"tiny": {"hidden": 64}}}`` -> ``{"model.tiny.hidden": 64}``."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def schema_default(key: str) -> object:
    """The default of a dotted config setting in today's schema (``_MISSING`` when there is none)."""
    import typing

    from pydantic import BaseModel

    from tunelab.config import TunelabConfig, method_specs, objective_specs

    model: type[BaseModel] | None = TunelabConfig
    *sections, name = key.split(".")
    if sections and sections[0] in objective_specs():  # an objective's section: its settings class
        model, sections = objective_specs()[sections[0]].settings, sections[1:]
    elif sections == ["method"]:  # the method's settings: the first method that has the key
        model = next((spec.settings for spec in method_specs().values() if name in spec.settings.model_fields), None)
        sections = []
    for part in sections:
        field = model.model_fields.get(part) if model else None
        kinds = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    field = model.model_fields.get(name) if model else None
    return _MISSING if field is None else field.get_default(call_default_factory=True)


def ensure_shipped(name: str) -> Path:
    """The shipped run of an example others start from, made with its documented command when missing or stale."""
    example = EXAMPLES[name]
    output = REPO / example.shipped_output
    if not made_by(output, example):
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
    """``start/<eval metric>`` (first evaluation), ``final/`` (last), ``change/``, ``max/kl``, steps, train seconds."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row for row in rows if any(key.startswith("eval_") for key in row)]
    found: dict[str, float] = {}
    for prefix, row in (("start", evals[0] if evals else {}), ("final", evals[-1] if evals else {})):
        found.update({f"{prefix}/{k}": v for k, v in row.items() if k.startswith("eval_")})
    if len(evals) > 1:
        found.update({f"change/{k}": evals[-1][k] - v for k, v in evals[0].items() if k in evals[-1] and
                      k.startswith("eval_")})
    kls = [row["kl"] for row in rows if "kl" in row and not any(key.startswith("eval_") for key in row)]
    if kls:  # PPO/GRPO: KL to the reference per answer (KTO: its KL estimate), at its largest
        found["max/kl"] = max(kls)
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
    if not made_by(REPO / run_dir, example, f"train.seed={seed}"):  # missing, unfinished or made by an older recipe
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


def number(value: float) -> str:
    """A measured value for the table: 3 decimals (3 significant digits below 0.1), integers as integers."""
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if value != 0 and abs(value) < 0.1:
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def spread(values: list[float]) -> str:
    """Mean and range of the seeds' values."""
    if len(values) == 1:
        return number(values[0])
    return f"{number(statistics.mean(values))} ({number(min(values))} to {number(max(values))})"


SHOWN = ("eval_exact_match", "eval_reward", "eval_rewards/accuracy", "eval_loss")


def worth_showing(metric: str) -> bool:
    """Unclaimed numbers the table shows too: the main held-out metrics, test exact match, steps, time."""
    prefix, _, name = metric.partition("/")
    return (prefix in ("start", "final") and name in SHOWN) or prefix == "exact_match_test" \
        or metric in ("steps", "train_seconds", "max/kl")


def table(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> tuple[str, bool]:
    """A Markdown table of claimed versus measured numbers, and whether every claim holds for every seed it speaks of.

    An example's claims come first, as declared, then the other numbers worth showing.
    """
    lines = [f"| example | number | claimed | accepted | {' | '.join(f'seed {s}' for s in seeds)} "
             f"| mean (min to max) | holds |",
             f"|---|---|---|---|{'---:|' * len(seeds)}---:|---|"]
    all_hold = True

    def row(name: str, metric: str, claim: Claim | None) -> None:
        nonlocal all_hold
        by_seed = results[name]
        shown = [s for s in seeds if metric in by_seed.get(s, {}) and (claim is None or claim.about(s))]
        if not shown:
            return
        values = [by_seed[s][metric] for s in shown]
        claimed = accepted = holds = ""
        if claim is not None:
            failing = [s for s in shown if not claim.holds_for(by_seed[s][metric])]
            all_hold &= not failing
            holds = "yes" if not failing else f"**NO** (seed {', '.join(map(str, failing))})"
            claimed = claim.stated + (f" (seed {', '.join(map(str, claim.seeds))})" if claim.seeds else "")
            accepted = f"{number(claim.low)} to {number(claim.high)}" if claim.low != claim.high else number(claim.low)
        cells = [number(by_seed[s][metric]) if s in shown else "" for s in seeds]
        lines.append(f"| {name} | {metric} | {claimed} | {accepted} | {' | '.join(cells)} | {spread(values)} "
                     f"| {holds} |")

    for name, by_seed in results.items():
        claims = EXAMPLES[name].claims
        for claim in claims:
            row(name, claim.metric, claim)
        claimed = {claim.metric for claim in claims}
        for metric in sorted({m for found in by_seed.values() for m in found} - claimed):
            if worth_showing(metric):
                row(name, metric, None)
    return "\n".join(lines), all_hold


MARK_START, MARK_END = "<!-- examples/check.py table: start -->", "<!-- examples/check.py table: end -->"


def machine() -> str:
    """The CPU, its core count and the torch version, for the table's heading."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    try:
        import torch
        version = f", torch {torch.__version__}"
    except ImportError:
        version = ""
    return f"{cpu}, {os.cpu_count()} cores{version}"


def run_dates(names: list[str], seeds: list[int]) -> str:
    """The first and last day the measured runs finished (from their run.json), or "" when none has one."""
    days = []
    for name in names:
        for seed in seeds:
            info = REPO / CHECK_RUNS / name / f"seed-{seed}" / "run.json"
            if info.is_file():
                days.append(str(json.loads(info.read_text()).get("finished_at", ""))[:10])
    days = sorted(day for day in days if day)
    if not days:
        return ""
    return days[0] if days[0] == days[-1] else f"{days[0]} to {days[-1]}"


def write_markdown(path: Path, text: str, command: str, names: list[str], seeds: list[int]) -> None:
    """Write the table with its provenance; into a file that has the table markers, between them."""
    dates = run_dates(names, seeds)
    heading = (f"Measured with `{command}` on {machine()}"
               + (f"; runs finished {dates}" if dates else "") + f"; table written {datetime.date.today()}.")
    block = f"{MARK_START}\n{heading}\n\n{text}\n{MARK_END}"
    old = path.read_text() if path.is_file() else ""
    if MARK_START in old and MARK_END in old:
        before, _, rest = old.partition(MARK_START)
        _, _, after = rest.partition(MARK_END)
        path.write_text(before + block + after)
    else:
        path.write_text(block + "\n")


def main(argv: list[str] | None = None, run: Callable[[str, int], dict[str, float]] = measure) -> int:
    """Run the chosen examples over the seeds; print the table; exit 1 when a claim does not hold."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("examples", nargs="*", help=f"examples to run: {', '.join(EXAMPLES)}")
    parser.add_argument("--all", action="store_true", help="run every example")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated train.seed values")
    parser.add_argument("--list", action="store_true", help="print the claims and where they are stated")
    parser.add_argument("--markdown", help="also write the table to this file (between its markers, if it has them)")
    parser.add_argument("--json", default=str(CHECK_RUNS / "results.json"), help="all measured numbers (JSON)")
    args = parser.parse_args(argv)
    if args.list:
        for example in EXAMPLES.values():
            for claim in example.claims:
                seeds = f" (seed {', '.join(map(str, claim.seeds))})" if claim.seeds else ""
                print(f"{example.name:10s} {claim.metric:28s} [{claim.low:g}, {claim.high:g}] "
                      f"{claim.stated!r}{seeds} in {', '.join(claim.where)}")
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
        command = "python examples/check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown(Path(args.markdown), text, command, names, seeds)
    return 0 if all_hold else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
