"""GRPO throughput: seconds per RL step (rollout + update), old trainer vs the engine, batched vs one by one.

Three recipes train the same GRPO run (a tiny Llama built offline, LoRA r16, the arithmetic
prompts, ``prompts_per_step`` prompts x ``num_generations`` answers of up to ``max_new_tokens``
tokens per step, fp32 on the CPU), each as ``python -m tunelab train`` in its own process:

1. ``old trainer``: tunelab at ``--baseline-commit`` (default: the commit before online RL moved
   onto the engine), whose ``train/rl/trainer.py`` had its own loop; its source is extracted with
   ``git archive`` into a temporary directory and put first on ``PYTHONPATH``;
2. ``engine, batched``: this checkout, ``grpo.rollout_generator: batched``
   (``generation_batch_size`` sequences per ``generate`` call);
3. ``engine, one by one``: this checkout, ``grpo.rollout_generator: one_by_one``.

A step's time is the difference of consecutive ``elapsed_s`` in metrics.jsonl (the first step,
which warms up, is left out); the table gives the median over steps and over ``--repeats`` runs,
which alternate between the recipes so that a change in the machine's load hits all of them.
Appends the table to benchmarks/RESULTS.md unless ``--no-write``.

Usage::

    python benchmarks/rl_throughput.py                 # ~10 minutes on 2 idle cores
    python benchmarks/rl_throughput.py --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BASELINE_COMMIT = "ef65131"
RECIPES = ("old trainer", "engine, batched", "engine, one by one")


def config(work: Path, model: Path, steps: int, prompts: int, generations: int, new_tokens: int,
           generator: str | None) -> dict:
    """The run's config; ``generator`` None: the old code's config (flat ``train.*`` GRPO settings, no generator key)."""
    train = {"objective": "grpo", "max_steps": steps, "lr": 1e-3, "schedule": "constant", "log_every": 1,
             "precision": "fp32", "device": "cpu", "seed": 0}
    grpo = {"reward_fn": ["exact_match"], "prompts_per_step": prompts, "num_generations": generations,
            "max_new_tokens": new_tokens, "generation_batch_size": 32, "temperature": 1.0, "kl_coef": 0.04}
    sections: dict = {"train": {**train, **grpo}}
    if generator is not None:  # this checkout: the settings in the objective's section
        sections = {"train": train, "grpo": {**grpo, "rollout_generator": generator}}
    return {"model": {"path": str(model), "tiny": {"hidden": 128, "layers": 2, "heads": 4, "vocab": 512,
                                                    "tokenizer_corpus": str(REPO / "examples/data/arithmetic_train.jsonl")}},
            "method": {"type": "lora", "rank": 16},
            "data": {"train": str(REPO / "examples/data/arithmetic_train.jsonl"), "max_length": 128},
            **sections, "eval": {"generate_samples": 0}, "output_dir": str(work)}


def run(recipe: str, work: Path, model: Path, baseline_src: Path, args: argparse.Namespace) -> list[float]:
    """Train one recipe in its own process; return its per-step seconds (first step left out)."""
    import yaml

    generator = {"old trainer": None, "engine, batched": "batched", "engine, one by one": "one_by_one"}[recipe]
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config(work / "out", model, args.steps, args.prompts, args.generations,
                                          args.new_tokens, generator)))
    src = baseline_src if recipe == "old trainer" else REPO / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), "--overwrite"], cwd=work,
                            env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows if "loss" in row]
    return [b - a for a, b in zip(elapsed[:-1], elapsed[1:])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--quick", action="store_true", help="3 steps of 4 prompts x 4 answers, one repeat")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.prompts, args.generations, args.repeats = 3, 4, 4, 1
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {recipe: [] for recipe in RECIPES}
    with tempfile.TemporaryDirectory(prefix="tunelab-rl-bench-") as tmp:
        root = Path(tmp)
        archive = subprocess.run(["git", "archive", args.baseline_commit, "src"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        model = root / "tiny-model"  # built by the first run, shared by all
        for repeat in range(args.repeats):
            order = RECIPES if repeat % 2 == 0 else RECIPES[::-1]
            for recipe in order:
                work = root / f"{recipe.replace(' ', '_').replace(',', '')}-{repeat}"
                work.mkdir()
                started = time.perf_counter()
                steps = run(recipe, work, model, root / "src", args)
                times[recipe] += steps
                print(f"{recipe}: {len(steps)} steps, median {statistics.median(steps):.2f} s/step "
                      f"(whole run {time.perf_counter() - started:.0f} s)", flush=True)
    load_after = os.getloadavg()
    old = statistics.median(times["old trainer"])
    lines = ["| recipe | steps timed | median s/step | vs old trainer |", "|---|---:|---:|---:|"]
    for recipe in RECIPES:
        median = statistics.median(times[recipe])
        lines.append(f"| {recipe} | {len(times[recipe])} | {median:.2f} | {old / median:.2f}x |")
    batched, one = statistics.median(times["engine, batched"]), statistics.median(times["engine, one by one"])
    summary = (f"- engine vs old trainer (batched): {old / batched:.2f}x the speed; batched vs one-by-one "
               f"generation: {one / batched:.2f}x")
    print("\n".join(lines) + "\n" + summary)
    if args.no_write:
        return 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/rl_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = [
        f"\n## rl_throughput — {time.strftime('%a %b %d %H:%M:%S UTC %Y', time.gmtime())}\n",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other "
        f"jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after): compare the ratios, not "
        "the seconds",
        f"- command: `{command.strip()}`; tunelab source {head} vs old trainer at {args.baseline_commit}",
        f"- setup: GRPO, tiny Llama (hidden 128, 2 layers, vocab 512, random weights), LoRA r16, fp32 CPU; "
        f"{args.prompts} prompts x {args.generations} answers of up to {args.new_tokens} tokens per step, "
        f"generation_batch_size 32, kl_coef 0.04 (a reference forward per step); {args.steps} steps x "
        f"{args.repeats} runs per recipe, alternating; the first step of each run is not timed",
        "",
        *lines,
        "",
        summary,
    ]
    with (BENCH / "RESULTS.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(section) + "\n")
    print("appended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
