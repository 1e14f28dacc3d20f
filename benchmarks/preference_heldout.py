"""Held-out preference metrics of DPO-family runs, with 95% intervals.

For each run directory (``tunelab train`` with ``objective: dpo|simpo|orpo`` and a held-out split)
it rebuilds the run's held-out pairs exactly as training did (same config, same seeded split,
same tokenized cache) and prints:

- the step-0 values (the untouched model, from the base model's log-probs) and the run's own eval
  rows from ``metrics.jsonl`` (held-out loss, accuracy as ``k/n`` with a Wilson 95% interval, margin);
- two baselines on the same pairs, to tell a learned preference from a shortcut: the base model's
  own preference (mean token log-prob of chosen > rejected, what SimPO/ORPO start from) and
  "the shorter answer wins" (trained tokens after truncation);
- with ``--per-pair``: every pair scored again with the run's final adapter (batched, packed and
  autocast as the run's evaluation, so it reproduces the run's numbers), the mean reward margin
  with a bootstrap 95% interval, the pairs ranked right and the DPO loss when the adapter is read
  as a DPO policy against the base, and the margin's correlation with the length difference.

A KTO run trains on labelled answers, not pairs: ``--pairs CONFIG`` names the config whose
held-out pairs to score it on (examples/real/kto.yaml is built from examples/real/dpo.yaml's split
by examples/real/prepare_kto.py), and its own eval rows give its held-out KTO loss.

Rewards follow the run's objective: with a reference (DPO, KTO) ``beta * (log pi - log ref)``
summed over the answer; SimPO/ORPO ``beta * mean token log pi``. A pair counts as right only when chosen > rejected (a tie
is wrong, as in training's metrics).

    python benchmarks/preference_heldout.py runs/real/dpo [runs/real/orpo ...] [--per-pair] [--json out.json]
    python benchmarks/preference_heldout.py runs/real/kto --pairs examples/real/dpo.yaml --per-pair

The base model's log-probs come from the precomputed reference cache of the data (a DPO run with
``precompute_reference`` (the dpo section) on the same data config writes it), else from one forward with the
adapter switched off.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from tunelab.config import load_config
from tunelab.data.templates import IGNORE_INDEX
from tunelab.data.tokenize import default_cache_dir, prepare_data
from tunelab.models.load import attention_for, load_model, load_tokenizer, resolve_load_dtype, stop_token_ids
from tunelab.models.precision import resolve_precision
from tunelab.train.engine import autocast_factory
from tunelab.train.batches import eval_batches
from tunelab.models.methods import method_spec
from tunelab.train.objectives import objective_spec
from tunelab.models.logprobs import sequence_logps
from tunelab.train.reference import model_fingerprint

Z95 = 1.959964


def wilson_interval(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``right / n`` (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(values: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values``."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score_pairs(model: torch.nn.Module, dataset: Any, cfg: Any, pad_id: int, autocast: Any) -> np.ndarray:
    """Summed log-probs of every held-out sequence, ``[pairs, 2]`` (chosen, rejected).

    Batched, packed and autocast exactly as the run's own evaluation and its precomputed reference
    (``train.batch_tokens``, ``data.packing``, the run's precision), so rewards compare like with like.
    """
    logps: list[float] = []
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(dataset, cfg.data.packing, cfg.train.batch_tokens, cfg.train.batch_size, pad_id):
            with autocast():
                logps.extend(sequence_logps(model, batch, cfg.train.loss_chunk_tokens)[0].float().tolist())
    return np.array(logps).reshape(-1, 2)


def cached_reference(data_config: Any, model_path: str, fingerprint: str) -> np.ndarray | None:
    """The base model's held-out log-probs from a precomputed reference cache of these pairs, if it exists."""
    cache = Path(data_config.data.cache_dir).expanduser() if data_config.data.cache_dir else default_cache_dir()
    model_path = str(Path(model_path).resolve())
    target = cache / fingerprint / "reference-eval" / model_fingerprint(model_path)
    if not (target / "done.json").is_file():
        return None
    import datasets

    return np.array(datasets.load_from_disk(str(target))["reference_logps"], dtype=np.float64)


def eval_rows(run: Path) -> list[dict[str, Any]]:
    """The evaluation rows of the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_loss" in r]


def token_counts(dataset: Any) -> np.ndarray:
    """Trained tokens of each held-out pair's chosen and rejected answer (after truncation), ``[pairs, 2]``."""
    def trained(labels: list[list[int]]) -> list[int]:
        return [sum(1 for t in row if t != IGNORE_INDEX) for row in labels]
    return np.stack([trained(dataset["labels"]), trained(dataset["pair_labels"])], axis=1)


def analyse(run: Path, per_pair: bool, pairs: Path | None = None) -> dict[str, Any]:
    """One run's held-out numbers (see the module docstring); ``per_pair`` scores every pair with its adapter.

    ``pairs``: a config whose held-out pairs to score the run on (same model), instead of the run's own.
    """
    cfg = load_config(run / "config.yaml")
    spec = objective_spec(cfg.train.objective)
    if spec.data != "pairs" and pairs is None:
        raise SystemExit(f"{run}: a {cfg.train.objective} run holds out {spec.data} records, not pairs: "
                         "name the config of the pairs to score it on with --pairs")
    pairs_cfg = load_config(pairs) if pairs else cfg
    beta = cfg.objective_settings.beta
    tokenizer = load_tokenizer(cfg.model.path)
    data = prepare_data(pairs_cfg.data, "pairs", pairs_cfg.train.seed, tokenizer,
                        stop_token_ids(cfg.model.path, tokenizer))
    if data.eval is None:
        raise SystemExit(f"{pairs or run}: no held-out pairs (data.val_ratio or data.eval)")
    n = len(data.eval)
    counts = token_counts(data.eval)
    rows = eval_rows(run)
    result: dict[str, Any] = {"run": str(run), "objective": cfg.train.objective, "beta": beta, "pairs": n,
                              "pairs_from": str(pairs or run), "eval_rows": rows}
    for row in rows:  # the run's own evaluations on its held-out pairs: accuracy is a share of n pairs
        if pairs is None:
            right = round(row.get("eval_rewards/accuracy", 0.0) * n)
            row["right"], row["accuracy_ci"] = right, wilson_interval(right, n)
    shorter = int((counts[:, 0] < counts[:, 1]).sum())
    result["shorter_wins"] = {"right": shorter, "accuracy": shorter / n, "ci": wilson_interval(shorter, n)}

    reference = cached_reference(pairs_cfg, cfg.model.path, data.fingerprint)
    model = None
    device = torch.device("cpu")
    autocast = autocast_factory(device, resolve_precision(cfg.train.precision, device))
    if per_pair or reference is None:
        base = load_model(cfg.model, resolve_load_dtype(cfg.model, not method_spec(cfg.method.type).trains_base, device), device,
                          attention_for(cfg.model, cfg.data.packing))
        model = PeftModel.from_pretrained(base, str(run / "final"))
    if reference is None:
        with model.disable_adapter():
            reference = score_pairs(model, data.eval, pairs_cfg, tokenizer.pad_token_id, autocast)
    base_mean = reference / np.maximum(counts, 1)
    base_right = int((base_mean[:, 0] > base_mean[:, 1]).sum())
    result["base_mean_logp"] = {"right": base_right, "accuracy": base_right / n, "ci": wilson_interval(base_right, n)}

    def rewards_of(logps: np.ndarray) -> np.ndarray:
        if spec.reference == "always":
            return beta * (logps - reference)
        return beta * logps / np.maximum(counts, 1)

    start = rewards_of(reference) @ np.array([1.0, -1.0])  # the untouched model (step 0)
    result["start"] = {"accuracy": float((start > 0).mean()), "margin": float(start.mean())}
    if model is None or not per_pair:
        return result
    policy = score_pairs(model, data.eval, pairs_cfg, tokenizer.pad_token_id, autocast)
    margins = rewards_of(policy) @ np.array([1.0, -1.0])
    dpo_beta = beta if spec.reference == "always" else 0.1  # SimPO/ORPO runs: the DPO default
    dpo_logits = dpo_beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    right = int((margins > 0).sum())
    length_diff = (counts[:, 0] - counts[:, 1]).astype(float)
    result["final"] = {
        "right": right, "accuracy": right / n, "ci": wilson_interval(right, n),
        "margin": float(margins.mean()), "margin_ci": bootstrap_mean_interval(margins),
        "dpo_beta": dpo_beta, "dpo_loss": float(np.mean(np.logaddexp(0.0, -dpo_logits))),
        "dpo_right": int((dpo_logits > 0).sum()),
        "margin_length_corr": float(np.corrcoef(margins, length_diff)[0, 1]) if length_diff.std() else None,
    }
    result["per_pair"] = {"policy": policy.tolist(), "reference": reference.tolist(), "tokens": counts.tolist()}
    return result


def print_report(result: dict[str, Any]) -> None:
    """A short table of one run's held-out numbers."""
    n = result["pairs"]
    print(f"\n## {result['run']} ({result['objective']}, beta {result['beta']}, {n} held-out pairs of "
          f"{result['pairs_from']})")
    start = result["start"]
    print(f"step 0, the untouched model (from the base log-probs): accuracy {start['accuracy']:.3f}, "
          f"margin {start['margin']:+.4f}")
    print("| step | eval loss | accuracy (Wilson 95%) | margin |")
    print("|---:|---:|---|---:|")
    for row in result["eval_rows"]:
        if "accuracy_ci" not in row:  # evaluated on its own held-out records (KTO): the loss only
            print(f"| {row['step']} | {row['eval_loss']:.4f} | - | - |")
            continue
        lo, hi = row["accuracy_ci"]
        print(f"| {row['step']} | {row['eval_loss']:.4f} | {row['right']}/{n} = {row['right'] / n:.3f} "
              f"({lo:.3f}-{hi:.3f}) | {row.get('eval_rewards/margin', float('nan')):+.4f} |")
    if "final" in result:
        final = result["final"]
        lo, hi = final["ci"]
        mlo, mhi = final["margin_ci"]
        print(f"final adapter, pair by pair: accuracy {final['right']}/{n} = {final['accuracy']:.3f} "
              f"(Wilson 95% {lo:.3f}-{hi:.3f}); margin {final['margin']:+.4f} (bootstrap 95% {mlo:+.4f} to "
              f"{mhi:+.4f}); as DPO against the base (beta {final['dpo_beta']}): {final['dpo_right']}/{n} right, "
              f"loss {final['dpo_loss']:.4f} (start 0.6931)")
        if final["margin_length_corr"] is not None:
            print(f"correlation of the margin with (chosen - rejected) length: {final['margin_length_corr']:+.3f}")
    for name, label in (("base_mean_logp", "the base model's mean log-prob prefers chosen"),
                        ("shorter_wins", "the shorter answer wins")):
        entry = result[name]
        lo, hi = entry["ci"]
        print(f"baseline, {label}: {entry['right']}/{n} = {entry['accuracy']:.3f} ({lo:.3f}-{hi:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (output_dir of tunelab train)")
    parser.add_argument("--per-pair", action="store_true",
                        help="also score every held-out pair with the final adapter (one forward over them): "
                        "margin interval, DPO loss against the base, length correlation")
    parser.add_argument("--json", type=Path, help="also write every number (and per-pair log-probs) here")
    parser.add_argument("--pairs", type=Path, help="score the runs on this config's held-out pairs instead of "
                        "their own (a KTO run: the DPO config its data were split from)")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        result = analyse(run, args.per_pair, args.pairs)
        print_report(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
