"""One prepared GPU run: tunelab's engine on CUDA, checked and timed against the plain HF+PEFT loop.

What it does, on one GPU, in one process tree (about 6 minutes on an H100/H200):

1. builds a randomly initialised Llama of the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads,
   8 KV heads, MLP 8192; vocabulary from a BPE tokenizer trained on the data file);
2. correctness: packed rows vs separate sequences (bf16 logits, per-token max difference) for
   ``packed_sdpa`` and transformers' ``sdpa`` block mask;
3. tunelab LoRA SFT (r16, all linear layers, bf16, padding-free packing, 16k tokens per step),
   with and without gradient checkpointing: useful tokens/s and peak GiB;
4. the plain HF+PEFT loop on the same model and data: dynamic padding (batch 8) and padding to
   max_length with gradient checkpointing (the common recipe);
5. resume on CUDA: a run stopped after its step-5 checkpoint and resumed gives the same losses.

Run on the GPU machine (the data file and wheels travel in ignored folders):

    python benchmarks/gpu_sft_smoke.py --data .gpu/alpaca_en_demo.json --out $OUT

It writes ``results.json``, ``table.md`` and ``runs.log`` (every run's output) under ``--out`` and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 2048
BATCH_TOKENS = 16384
SMOKE = False  # --smoke: a tiny model on the CPU, to check this script without a GPU
LOG_FILE = Path("runs.log")  # set under --out by main()


def log(text: str) -> None:
    """Print with a timestamp, unbuffered."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(command: list[str], log_file: Path, timeout: float) -> float:
    """Run a command, appending its output to ``log_file``; return wall seconds (raise on failure).

    All runs share one log file under ``--out`` so it comes back even when the call times out.
    """
    start = time.perf_counter()
    with log_file.open("a") as handle:
        handle.write(f"\n===== {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        print(log_file.read_text()[-4000:], flush=True)
        raise RuntimeError(f"{command[:4]} failed with {result.returncode}")
    return time.perf_counter() - start


def build_model(work: Path, data: Path) -> Path:
    """A random 1B-shaped Llama with a tokenizer trained on the data."""
    from tunelab.models.tiny import create_tiny_model

    if SMOKE:
        return create_tiny_model(work / "model-tiny", hidden=64, layers=2, heads=4, vocab=2000,
                                 max_positions=4096, tokenizer_corpus=data)
    return create_tiny_model(work / "model-1b", hidden=2048, layers=16, heads=32, kv_heads=8,
                             intermediate=8192, vocab=8000, max_positions=4096, tokenizer_corpus=data)


def packing_check(model_dir: Path) -> dict[str, float]:
    """Max |logit difference| between a packed row and the same sequences alone (bf16 weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.data.packing import collate_packed
    from tunelab.models.attention import register_packed_sdpa

    out = {}
    device = torch.device("cpu" if SMOKE else "cuda")
    generator = torch.Generator().manual_seed(0)
    lengths = [300, 1200, 57, 480]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    examples = [{"input_ids": torch.randint(10, vocab, (n,), generator=generator).tolist(), "labels": [-100] * n}
                for n in lengths]
    for name in ("packed_sdpa", "sdpa"):
        attention = register_packed_sdpa() if name == "packed_sdpa" else name
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attention)
        model = model.to(device).eval()
        batch = collate_packed(examples).to(device)
        with torch.no_grad():
            packed = model(**batch.model_inputs()).logits[0].float()
            separate = torch.cat([model(torch.tensor([e["input_ids"]], device=device)).logits[0].float()
                                  for e in examples])
        out[f"{name}_max_abs_diff"] = float((packed - separate).abs().max())
        out[f"{name}_logit_scale"] = float(separate.abs().max())
        del model
    return out


def tunelab_config(model_dir: Path, data: Path, out: Path, **train: Any) -> dict[str, Any]:
    """The tunelab LoRA run measured here."""
    return {
        "model": {"path": str(model_dir)},
        "method": {"type": "lora", "rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(data), "max_length": MAX_LENGTH, "cache_dir": str(out.parent / "cache")},
        "train": {"max_steps": 6 if SMOKE else 25, "lr": 2e-4, "batch_tokens": BATCH_TOKENS, "log_every": 1, "seed": 0,
                  "warmup_ratio": 0.1, **train},
        "output_dir": str(out),
    }


def run_tunelab(name: str, config: dict[str, Any], work: Path, *extra: str) -> dict[str, Any]:
    """Train with ``python -m tunelab train``; tokens/s over steps after the 5th, peak memory."""
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    wall = run([sys.executable, "-m", "tunelab", "train", str(path), *extra], LOG_FILE, timeout=400)
    rows = [json.loads(line) for line in (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    timed = [r for r in steps if r["step"] > 5] or steps
    return {
        "recipe": name,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(mean(r["tokens_per_s"] for r in timed)),
        "peak_gib": max(r.get("peak_mem_gib", 0.0) for r in steps),
        "losses": [r["loss"] for r in steps],
    }


def run_hf(name: str, model_dir: Path, data: Path, work: Path, padding: str, steps: int, checkpointing: bool) -> dict:
    """The plain HF+PEFT loop (benchmarks/_hf_baseline.py) in bf16 on the GPU."""
    result = work / f"{name}.json"
    command = [sys.executable, "benchmarks/_hf_baseline.py", "--model", str(model_dir), "--data", str(data),
               "--padding", padding, "--max-length", str(MAX_LENGTH), "--batch-size", "8", "--dropout", "0.0",
               "--max-steps", str(min(steps, 5) if SMOKE else steps), "--output-dir", str(work / name),
               "--result", str(result)] + ([] if SMOKE else ["--device", "cuda", "--bf16"])
    if checkpointing:
        command.append("--gradient-checkpointing")
    wall = run(command, LOG_FILE, timeout=400)
    summary = json.loads(result.read_text())
    seconds, tokens = summary["step_seconds"][3:], summary["step_real_tokens"][3:]
    return {
        "recipe": name,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(sum(tokens) / sum(seconds)),
        "peak_gib": round(summary["peak_mem_gib"] or 0.0, 2),
        "losses": summary["losses"],
    }


def resume_check(model_dir: Path, data: Path, work: Path) -> dict[str, Any]:
    """10 steps straight vs 5 steps, a copy cut back to its step-5 checkpoint, then --resume."""
    whole = run_tunelab("resume_whole", tunelab_config(model_dir, data, work / "resume_whole", max_steps=10,
                                                       save_every=5), work)
    cut = work / "resume_cut"
    shutil.copytree(work / "resume_whole", cut)
    shutil.rmtree(cut / "checkpoints" / "step-10")
    shutil.rmtree(cut / "final")
    config = tunelab_config(model_dir, data, cut, max_steps=10, save_every=5)
    resumed = run_tunelab("resume_cut", config, work, "--resume")
    pairs = list(zip(whole["losses"], resumed["losses"]))
    return {"losses_whole": whole["losses"], "losses_resumed": resumed["losses"],
            "max_abs_diff": max(abs(a - b) for a, b in pairs)}


def main() -> None:
    """Run every check and measurement; write results.json and table.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="alpaca JSON file")
    parser.add_argument("--out", required=True, help="folder for results.json and table.md")
    parser.add_argument("--work", default="/tmp/tunelab-gpu", help="scratch folder")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    args = parser.parse_args()
    global SMOKE, LOG_FILE
    SMOKE = args.smoke
    out, work, data = Path(args.out), Path(args.work), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    LOG_FILE = out / "runs.log"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("TUNELAB_CACHE", str(work / "cache"))
    import torch

    device = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0)
    results: dict[str, Any] = {"device": device, "torch": torch.__version__}
    log(f"device {results['device']}, torch {results['torch']}")
    model_dir = build_model(work, data)
    log("model built")
    results["packing"] = packing_check(model_dir)
    log(f"packing check {results['packing']}")
    rows = [
        run_tunelab("tunelab_lora_packed", tunelab_config(model_dir, data, work / "t1"), work),
        run_tunelab("tunelab_lora_packed_ckpt", tunelab_config(model_dir, data, work / "t2",
                                                               gradient_checkpointing=True), work),
    ]
    log(f"tunelab done {[(r['recipe'], r['tokens_per_s']) for r in rows]}")
    rows.append(run_hf("hf_peft_dynamic", model_dir, data, work, "dynamic", 25, checkpointing=False))
    rows.append(run_hf("hf_peft_max_length_ckpt", model_dir, data, work, "max_length", 10, checkpointing=True))
    log(f"hf done {[(r['recipe'], r['tokens_per_s']) for r in rows[2:]]}")
    results["throughput"] = rows
    results["resume"] = resume_check(model_dir, data, work)
    log(f"resume max diff {results['resume']['max_abs_diff']}")

    best_hf = max(r["tokens_per_s"] for r in rows if r["recipe"].startswith("hf"))
    lines = ["| recipe | useful tokens/s | peak GiB | wall s | ratio vs best HF |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['tokens_per_s']:,} | {row['peak_gib']:.1f} | {row['wall_s']} | "
                     f"{row['tokens_per_s'] / best_hf:.2f}x |")
    table = "\n".join(lines)
    print(table, flush=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
