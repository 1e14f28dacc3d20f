"""Per-step losses of the examples, to prove that a refactor of the engine changes no number.

Runs, in fp32 on the CPU with the examples' seed, a short quickstart SFT (the parent model of the
others), then short DPO, GRPO and PPO runs on top of it (examples/{quickstart,dpo,grpo,ppo}.yaml
with overrides that keep each to a minute or two), and writes every metrics row's numbers (loss,
grad norm, rewards, KL, evaluation; not the timings) to a JSON file.

Usage::

    python benchmarks/loss_parity.py --out benchmarks/parity/before.json     # on the old code
    python benchmarks/loss_parity.py --compare benchmarks/parity/before.json # on the new code

``--compare`` prints the largest difference per run over the numbers both sides log (and the keys
only one side logs) and exits 1 when any number differs by more than ``--tolerance`` (default 0:
identical). ``--measured FILE`` compares an earlier ``--out`` file without training again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMINGS = {"elapsed_s", "step_s", "tokens_per_s", "lr_s", "peak_mem_gib", "rollout_s"}

COMMON = ["train.precision=fp32", "train.device=cpu", "train.log_every=1"]


DENSE_REWARD = '''
def digits(prompts, completions, references):
    """The share of answer characters that are digits: a dense reward a 20-step SFT model already varies on."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
'''


def runs(work: Path) -> dict[str, tuple[str, list[str]]]:
    """Each run: its example file and its overrides (the SFT run is the others' model).

    The RL runs add a dense reward (the share of digits in the answer) to the examples' exact
    match: a 20-step SFT model is never exactly right, and with zero rewards every loss is 0.
    """
    parent = work / "quickstart" / "final"
    reward = work / "digits_reward.py"
    work.mkdir(parents=True, exist_ok=True)
    reward.write_text(DENSE_REWARD)

    def rl(objective: str, generations: int) -> list[str]:
        return [f"model.path={parent}", "train.max_steps=4", f"{objective}.prompts_per_step=4", "train.eval_every=0",
                "eval.generate_samples=16", f"{objective}.reward_fn=[exact_match, '{reward}:digits']",
                f"output_dir={work / objective}", f"{objective}.num_generations={generations}"]

    return {
        "quickstart": ("examples/quickstart.yaml", [
            f"model.path={work / 'tiny-model'}", f"output_dir={work / 'quickstart'}", "train.max_steps=20",
            "train.eval_every=10", "eval.generate_samples=20"]),
        "dpo": ("examples/dpo.yaml", [f"model.path={parent}", f"output_dir={work / 'dpo'}", "train.max_steps=10",
                                      "train.eval_every=5"]),
        "grpo": ("examples/grpo.yaml", rl("grpo", 4)),
        "ppo": ("examples/ppo.yaml", rl("ppo", 2)),
    }


def numbers(metrics_file: Path) -> list[dict[str, float]]:
    """The metrics rows without their timings."""
    rows = []
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if k not in TIMINGS and isinstance(v, (int, float))})
    return rows


def measure(work: Path) -> dict[str, list[dict[str, float]]]:
    """Train every run in order; return their metrics rows."""
    import torch

    from tunelab.config import load_config
    from tunelab.train.engine import train

    # One thread: float sums then add up in one order whatever the machine's core count, so files
    # measured on different machines (or with different CPU affinity) compare exactly.
    torch.set_num_threads(1)

    results = {}
    for name, (example, overrides) in runs(work).items():
        started = time.perf_counter()
        config = load_config(REPO / example, [*overrides, *COMMON])
        result = train(config, overwrite=True)
        results[name] = numbers(result.output_dir / "metrics.jsonl")
        print(f"{name}: {len(results[name])} rows in {time.perf_counter() - started:.1f} s", flush=True)
    return results


def largest_difference(before: list[dict[str, float]], after: list[dict[str, float]]) -> tuple[float, str, set[str]]:
    """The largest absolute difference between two runs' rows on the numbers both log, where it is, and
    the keys only one of them logs."""
    if len(before) != len(after):
        return math.inf, f"{len(before)} rows before, {len(after)} after", set()
    worst, where, apart = 0.0, "", set()
    for old, new in zip(before, after):
        apart |= old.keys() ^ new.keys()
        for key in old.keys() & new.keys():
            difference = abs(old[key] - new[key])
            if difference > worst or (math.isnan(difference) and not math.isnan(worst)):
                worst, where = difference, f"step {old.get('step')} {key}: {old[key]!r} -> {new[key]!r}"
    return worst, where, apart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the measured numbers here")
    parser.add_argument("--compare", type=Path, help="compare the measured numbers with this file")
    parser.add_argument("--tolerance", type=float, default=0.0)
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--measured", type=Path, help="compare this earlier --out file instead of training")
    args = parser.parse_args()
    if args.measured:
        results = json.loads(args.measured.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="tunelab-parity-") as tmp:
            results = measure((args.work or Path(tmp)).resolve())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
    if not args.compare:
        return 0
    saved = json.loads(args.compare.read_text())
    failed = False
    print(f"{'run':<12} {'rows':>5} {'max |difference|':>18}  where; keys logged by one side only")
    for name, rows in results.items():
        worst, where, apart = largest_difference(saved.get(name, []), rows)
        failed |= not worst <= args.tolerance
        print(f"{name:<12} {len(rows):>5} {worst:>18.3g}  {where or '-'}; {', '.join(sorted(apart)) or '-'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
