"""GPU speed of tunelab against the plain HF+PEFT recipes, measured side by side in one run.

One prepared script for one GPU (about 8 minutes on an H100/H200 with the default step counts):

1. builds a randomly initialised Llama of the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads,
   8 KV heads, MLP 8192, vocabulary 128,256 with tied embeddings: 1.24B parameters), with a BPE
   tokenizer trained on the data, and an alpaca-like data set (lognormal lengths, median about 220
   tokens, at most 2048);
2. checks packed attention on the real shape (one packed row vs the same sequences alone, bf16);
3. runs the HF+PEFT recipes of issue 9 (pad to 2048 + checkpointing; dynamic padding, batch 8,
   checkpointing; padding-free packing with and without checkpointing; packing + Liger when
   liger-kernel is installed; full fine-tuning with packing and checkpointing);
4. runs tunelab: the plain path (per-sequence SDPA, full logits, eager) and the fast path
   (varlen attention, chunked loss, compiled layers, fused AdamW) for LoRA, 50 steps each from the
   same seed (their loss curves are compared), the fast path with selective checkpointing, and
   full fine-tuning;
5. DPO with LoRA: tunelab against the padded HF+PEFT+TRL-style loop (``_hf_dpo_baseline.py``);
6. profiles three steps of the fast LoRA path (top CUDA kernels and CPU ops) into ``profile.txt``.

Every recipe runs in its own process; ``results.json`` and ``table.md`` under ``--out`` are
rewritten after each one, so a run cut short still returns what it measured. ``--only`` runs a
subset (e.g. ``--only hf`` in one call and ``--only tunelab,dpo`` in the next).

    python benchmarks/gpu_sft.py --out $OUT                     # on the GPU
    python benchmarks/gpu_sft.py --preset cpu --out /tmp/cpu    # a small model, fp32, on a CPU (~10 min)
    python benchmarks/gpu_sft.py --preset smoke --out /tmp/s    # a tiny model on a CPU: checks the script

The GPU machine of the device tool has torch and triton but no network and older libraries, and
``../shared`` does not travel: carry the wheels and the two data files in ignored folders
(``pip download --no-deps -d .whl liger-kernel transformers==5.24.0 peft==0.21.2 datasets
pydantic pydantic-core tokenizers`` for its Python; ``cp ../shared/data/llamafactory_demo/
{alpaca_en_demo,dpo_en_demo}.json .gpu/``) and run

    pip install -q --no-index --no-deps .whl/*.whl && pip install -q --no-deps -e . &&
    python benchmarks/gpu_sft.py --alpaca .gpu/alpaca_en_demo.json --dpo-data .gpu/dpo_en_demo.json --out $OUT

MFU counts 6 x parameters FLOPs per token for full fine-tuning and 4 x for LoRA (no weight
gradients for the frozen base), without attention or recomputation, against ``--peak-tflops``
(796: the bf16 matmul rate issue 9 measured on an H200).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO.parent / "shared" / "data" / "llamafactory_demo"
GROUPS = ("check", "hf", "tunelab", "dpo", "profile")
# Model shape, data and step counts per preset. "gpu" is issue 9's setting; the CPU presets run in fp32.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"device": "cuda", "shape": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                                        "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                                        "tie_word_embeddings": True, "rope_theta": 500000.0, "head_dim": 64},
            "records": 4000, "max_length": 2048, "batch_tokens": 16384, "dpo_tokens": 8192,
            "long": 50, "short": 15, "hf_steps": 12},
    "cpu": {"device": "cpu", "shape": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "intermediate_size": 704, "vocab_size": 32000,
                                       "head_dim": 64},
            "records": 1500, "max_length": 1024, "batch_tokens": 4096, "dpo_tokens": 4096,
            "long": 30, "short": 10, "hf_steps": 8},
    "smoke": {"device": "cpu", "shape": None, "records": 300, "max_length": 256, "batch_tokens": 1024,
              "dpo_tokens": 1024, "long": 8, "short": 6, "hf_steps": 4},
}


class Bench:
    """Settings of this run and the rows measured so far (written to ``--out`` after each recipe)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.preset = PRESETS[args.preset]
        self.on_gpu = self.preset["device"] == "cuda"
        self.out, self.work = Path(args.out), Path(args.work)
        self.log_file = self.out / "runs.log"
        self.peak_tflops = args.peak_tflops
        self.batch_tokens, self.max_length = self.preset["batch_tokens"], self.preset["max_length"]
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.params = 0
        self.alpaca, self.dpo_data = Path(args.alpaca).resolve(), Path(args.dpo_data).resolve()

    def log(self, text: str) -> None:
        """Print with a timestamp, unbuffered."""
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def run(self, command: list[str], timeout: float = 500) -> float:
        """Run a command, its output appended to runs.log under --out; return wall seconds."""
        start = time.perf_counter()
        with self.log_file.open("a") as handle:
            handle.write(f"\n===== {' '.join(command)}\n")
            handle.flush()
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
        if result.returncode != 0:
            print(self.log_file.read_text()[-3000:], flush=True)
            raise RuntimeError(f"{command[:4]} failed with exit code {result.returncode}")
        return time.perf_counter() - start

    def add(self, row: dict[str, Any]) -> None:
        """Record a recipe's row and rewrite results.json and table.md."""
        flops_per_token = (6 if row.get("full") else 4) * self.params
        row["mfu"] = row["tokens_per_s"] * flops_per_token / (self.peak_tflops * 1e12) if self.params else 0.0
        self.rows.append(row)
        self.log(f"{row['recipe']}: {row['tokens_per_s']:,} tokens/s, peak {row['peak_gib']:.1f} GiB")
        self.save()

    def save(self) -> None:
        """Write results.json and table.md under --out."""
        self.results["rows"] = self.rows
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "table.md").write_text(self.table() + "\n")

    def table(self) -> str:
        """The markdown table: each recipe against the best HF+PEFT recipe of its kind."""
        lines = ["| recipe | config | useful tokens/s | peak GiB | MFU | vs best HF+PEFT of its kind |",
                 "|---|---|---:|---:|---:|---:|"]
        for row in self.rows:
            peers = [r["tokens_per_s"] for r in self.rows if r["recipe"].startswith("hf")
                     and r.get("kind") == row.get("kind")]
            ratio = f"{row['tokens_per_s'] / max(peers):.2f}x" if peers else "-"
            peak, mfu = (f"{row['peak_gib']:.1f}", f"{row['mfu']:.1%}") if self.on_gpu else ("-", "-")
            lines.append(f"| {row['recipe']} | {row['config']} | {row['tokens_per_s']:,} | {peak} | {mfu} | {ratio} |")
        return "\n".join(lines)


def build_model(bench: Bench) -> Path:
    """A random model of the preset's shape (Llama-3.2-1B on a GPU) with a tokenizer trained on alpaca."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.models.tiny import create_tiny_model

    shape = bench.preset["shape"]
    if shape is None:
        path = create_tiny_model(bench.work / "model", hidden=64, layers=2, heads=4, kv_heads=2, vocab=2000,
                                 max_positions=4096, tokenizer_corpus=bench.alpaca)
    else:
        path = create_tiny_model(bench.work / "model", hidden=64, layers=1, heads=4, vocab=8000,
                                 max_positions=4096, tokenizer_corpus=bench.alpaca)
        config = AutoConfig.from_pretrained(path)
        config.update({**shape, "max_position_embeddings": 4096})
        torch.manual_seed(0)
        with torch.device(bench.preset["device"]):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bench.on_gpu else torch.float32)
        for stale in path.glob("*.safetensors"):
            stale.unlink()
        model.save_pretrained(path)
        del model
        if bench.on_gpu:
            torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(path, device_map="meta")
    bench.params = sum(p.numel() for p in model.parameters())
    return path


def build_data(bench: Bench, model_dir: Path) -> Path:
    """Alpaca-like records whose rendered lengths are lognormal (median ~220 tokens, at most max_length)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = json.loads(bench.alpaca.read_text())
    words = " ".join(r["instruction"] + " " + r["output"] for r in records).split()
    sample = " ".join(words[:2000])
    tokens_per_word = len(tokenizer(sample)["input_ids"]) / 2000
    rng = random.Random(0)
    count = bench.preset["records"]
    out = []
    for index in range(count):
        target = min(bench.max_length - 40, max(24, int(rng.lognormvariate(math.log(220), 0.7))))
        start = rng.randrange(len(words) - 4096)
        instruction = " ".join(words[start:start + 12])
        output_words = max(4, int(target / tokens_per_word) - 12)
        out.append({"instruction": instruction, "input": "", "output": " ".join(words[start + 12:start + 12 + output_words])})
    path = bench.work / "alpaca_like.json"
    path.write_text(json.dumps(out))
    lengths = [len(tokenizer(r["instruction"] + " " + r["output"])["input_ids"]) + 10 for r in out[:500]]
    bench.results["data"] = {"records": count, "median_tokens": median(lengths), "max_tokens": max(lengths)}
    bench.log(f"data: {count} records, median ~{median(lengths):.0f} tokens, max {max(lengths)}")
    return path


def packing_check(bench: Bench, model_dir: Path) -> None:
    """Max |logit difference| of a packed row vs the same sequences alone, per packed attention (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.data.packing import collate_packed
    from tunelab.models.attention import packed_kernel, register_packed_sdpa

    device = torch.device(bench.preset["device"])
    dtype = torch.bfloat16 if bench.on_gpu else torch.float32
    generator = torch.Generator().manual_seed(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    examples = [{"input_ids": torch.randint(10, min(vocab, 8000), (n,), generator=generator).tolist(),
                 "labels": [-100] * n} for n in (300, 1200, 57, 480)]
    check: dict[str, Any] = {"kernel": packed_kernel(device, dtype)}
    for name, attention in (("packed_varlen", register_packed_sdpa(True)), ("packed_sdpa", register_packed_sdpa())):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
        model = model.to(device).eval()
        batch = collate_packed(examples).to(device)
        with torch.no_grad():
            packed = model(**batch.model_inputs()).logits[0].float()
            separate = torch.cat([model(torch.tensor([e["input_ids"]], device=device)).logits[0].float()
                                  for e in examples])
        check[f"{name}_max_abs_diff"] = float((packed - separate).abs().max())
        check["logit_scale"] = float(separate.abs().max())
        del model
    bench.results["packing_check"] = check
    bench.log(f"packing check: {check}")
    bench.save()


def tunelab_row(bench: Bench, name: str, config_text: str, model_dir: Path, data: Path, method: dict,
                train: dict, steps: int, kind: str, objective_data: Path | None = None) -> dict[str, Any]:
    """Train with ``python -m tunelab train``; tokens/s over the steps after the 5th (compile is done)."""
    import yaml

    if not bench.on_gpu and train.get("attention") == "packed_varlen":  # say what a CPU really ran
        config_text += " [on a CPU: SDPA per sequence" + ("]" if train.get("compile") == "on" else ", eager]")
    out = bench.work / name
    config = {
        "model": {"path": str(model_dir), "attn_implementation": train.pop("attention", "auto")},
        "method": method,
        "data": {"train": str(objective_data or data), "max_length": bench.max_length,
                 "cache_dir": str(bench.work / "cache"),
                 # pairs whose prompt fills max_length are dropped and counted, as the TRL-style loop drops them
                 **({"on_error": "skip"} if objective_data else {})},
        "train": {"max_steps": steps, "lr": 2e-4, "batch_tokens": bench.batch_tokens, "log_every": 1, "seed": 0,
                  "warmup_ratio": 0.1, "precision": "bf16" if bench.on_gpu else "fp32", **train},
        "output_dir": str(out),
    }
    path = bench.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    wall = bench.run([sys.executable, "-m", "tunelab", "train", str(path), "--overwrite"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in rows if "loss" in r]
    timed = [r for r in steps_logged if r["step"] > 5] or steps_logged
    return {"recipe": name, "config": config_text, "kind": kind, "full": method["type"] == "full",
            "wall_s": round(wall, 1), "tokens_per_s": round(mean(r["tokens_per_s"] for r in timed)),
            "peak_gib": max(r.get("peak_mem_gib", 0.0) for r in steps_logged),
            "losses": [r["loss"] for r in steps_logged]}


def hf_row(bench: Bench, name: str, config_text: str, model_dir: Path, data: Path, padding: str, batch_size: int,
           steps: int, kind: str, *flags: str, script: str = "_hf_baseline.py") -> dict[str, Any]:
    """One plain HF+PEFT recipe in its own process (bf16 on the GPU)."""
    result = bench.work / f"{name}.json"
    command = [sys.executable, f"benchmarks/{script}", "--model", str(model_dir), "--data", str(data),
               "--max-length", str(bench.max_length), "--batch-size", str(batch_size), "--dropout", "0.0",
               "--max-steps", str(steps), "--output-dir", str(bench.work / name), "--result", str(result), *flags]
    if padding:
        command += ["--padding", padding]
    if bench.on_gpu:
        command += ["--device", "cuda", "--bf16"]
    wall = bench.run(command)
    summary = json.loads(result.read_text())
    seconds, tokens = summary["step_seconds"][3:], summary["step_real_tokens"][3:]
    return {"recipe": name, "config": config_text, "kind": kind, "full": "--full" in flags, "wall_s": round(wall, 1),
            "tokens_per_s": round(sum(tokens) / sum(seconds)), "peak_gib": round(summary["peak_mem_gib"] or 0.0, 2),
            "losses": summary["losses"]}


LORA = {"type": "lora", "rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
PLAIN = {"attention": "packed_sdpa", "chunked_loss": "off", "compile": "off", "gradient_checkpointing": True}
FAST = {"attention": "packed_varlen", "chunked_loss": "on", "compile": "auto", "gradient_checkpointing": True}


def run_hf(bench: Bench, model_dir: Path, data: Path) -> None:
    """The HF+PEFT recipes of issue 9's table, on the same model and data."""
    flat_batch = max(8, bench.batch_tokens // 240)  # records per flattened row: ~16k tokens
    steps = bench.preset["hf_steps"]
    recipes = [
        ("hf_pad_max_length_ckpt", f"LoRA, pad to {bench.max_length}, batch 8, checkpointing", "max_length", 8,
         "lora", "--gradient-checkpointing"),
        ("hf_dynamic_ckpt", "LoRA, dynamic padding, batch 8, checkpointing", "dynamic", 8, "lora",
         "--gradient-checkpointing"),
        ("hf_flatten_ckpt", "LoRA, padding-free packing, checkpointing", "flatten", flat_batch, "lora",
         "--gradient-checkpointing"),
        ("hf_flatten", "LoRA, padding-free packing, no checkpointing", "flatten", flat_batch, "lora"),
        ("hf_flatten_full_ckpt", "full FT, padding-free packing, checkpointing", "flatten", flat_batch, "full",
         "--gradient-checkpointing", "--full"),
    ]
    try:
        import liger_kernel  # noqa: F401

        recipes.insert(4, ("hf_flatten_liger_ckpt", "LoRA, packing + Liger kernels, checkpointing", "flatten",
                           flat_batch, "lora", "--gradient-checkpointing", "--liger"))
    except ImportError:
        bench.results["liger"] = "liger-kernel not installed: its recipe was not run"
    for name, text, padding, batch, kind, *flags in recipes:
        bench.add(hf_row(bench, name, text, model_dir, data, padding, batch, steps, kind, *flags))


def run_tunelab(bench: Bench, model_dir: Path, data: Path) -> None:
    """tunelab's plain and fast paths (LoRA, 50 steps each, loss curves compared), variants and full FT."""
    long, short = bench.preset["long"], bench.preset["short"]
    plain = tunelab_row(bench, "tunelab_lora_plain", "LoRA, packing, per-sequence SDPA, full logits, eager, ckpt",
                        model_dir, data, LORA, dict(PLAIN), long, "lora")
    bench.add(plain)
    fast = tunelab_row(bench, "tunelab_lora_fast", "LoRA, packing, varlen, chunked loss, compiled, ckpt",
                       model_dir, data, LORA, dict(FAST), long, "lora")
    bench.add(fast)
    difference = [abs(a - b) for a, b in zip(plain["losses"], fast["losses"])]
    bench.results["fast_vs_plain"] = {"steps": len(difference), "max_abs_loss_diff": max(difference),
                                      "mean_abs_loss_diff": mean(difference),
                                      "final_losses": [plain["losses"][-1], fast["losses"][-1]]}
    bench.log(f"fast vs plain over {len(difference)} steps: max |loss diff| {max(difference):.4g}")
    if not bench.on_gpu:  # compile's auto setting skips CPUs: measure what forcing it gives
        bench.add(tunelab_row(bench, "tunelab_lora_fast_compiled", "fast path with train.compile: on",
                              model_dir, data, LORA, {**FAST, "compile": "on"}, short, "lora"))
    bench.add(tunelab_row(bench, "tunelab_lora_fast_ckpt_half", "fast path, checkpointing on half the layers",
                          model_dir, data, LORA, {**FAST, "checkpoint_layers": 0.5}, short, "lora"))
    bench.add(tunelab_row(bench, "tunelab_lora_fast_no_ckpt", "fast path, no checkpointing",
                          model_dir, data, LORA, {**FAST, "gradient_checkpointing": False}, short, "lora"))
    bench.add(tunelab_row(bench, "tunelab_full_fast", "full FT, fast path, ckpt, fused AdamW on CUDA",
                          model_dir, data, {"type": "full"}, {**FAST, "lr": 1e-5}, short, "full"))


def run_dpo(bench: Bench, model_dir: Path) -> None:
    """DPO with LoRA: tunelab (pairs packed padding-free) against the padded HF+PEFT+TRL-style loop."""
    steps = bench.preset["hf_steps"]
    bench.add(hf_row(bench, "hf_dpo_padded", "DPO LoRA, chosen+rejected padded, batch 8 pairs", model_dir, bench.dpo_data,
                     "", 8, steps, "dpo", script="_hf_dpo_baseline.py"))
    bench.add(tunelab_row(bench, "tunelab_dpo_fast", "DPO LoRA, pairs packed, varlen, compiled", model_dir, bench.dpo_data,
                          LORA, {**FAST, "objective": "dpo", "chunked_loss": "auto",  # dpo.beta: its default 0.1
                                 "batch_tokens": bench.preset["dpo_tokens"]}, steps + 4, "dpo",
                          objective_data=bench.dpo_data))


def run_profile(bench: Bench, model_dir: Path, data: Path) -> None:
    """Profile three steps of the fast LoRA path: where the time goes, kernel by kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunelab.config import TunelabConfig
    from tunelab.train.engine import train

    train_cfg = {**FAST, "max_steps": 3, "lr": 2e-4, "batch_tokens": bench.batch_tokens, "seed": 0,
                 "precision": "bf16" if bench.on_gpu else "fp32"}
    attention = train_cfg.pop("attention")
    config = TunelabConfig.model_validate({
        "model": {"path": str(model_dir), "attn_implementation": attention}, "method": LORA,
        "data": {"train": str(data), "max_length": bench.max_length, "cache_dir": str(bench.work / "cache")},
        "train": train_cfg, "output_dir": str(bench.work / "profiled")})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        train(config, overwrite=True)
    averages = profiler.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = (f"== top ops by {sort} (3 steps + model load and setup)\n"
            + averages.table(sort_by=sort, row_limit=30)
            + "\n== top ops by self_cpu_time_total\n" + averages.table(sort_by="self_cpu_time_total", row_limit=20))
    (bench.out / "profile.txt").write_text(text)
    bench.log("profile written to profile.txt")


def main() -> None:
    """Run the chosen groups; results.json, table.md, runs.log (and profile.txt) go to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, table.md, runs.log, profile.txt")
    parser.add_argument("--work", default="/tmp/tunelab-gpu-sft", help="scratch folder (model, data, runs)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--peak-tflops", type=float, default=796.0, help="bf16 matmul peak for MFU")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                        help="gpu: issue 9's 1B setting; cpu: a small model in fp32; smoke: a tiny one (checks the script)")
    parser.add_argument("--alpaca", default=str(DEMO_DATA / "alpaca_en_demo.json"), help="alpaca JSON (tokenizer, words)")
    parser.add_argument("--dpo-data", default=str(DEMO_DATA / "dpo_en_demo.json"), help="preference pairs for DPO")
    args = parser.parse_args()
    groups = set(args.only.split(","))
    if unknown := groups - set(GROUPS):
        parser.error(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    bench = Bench(args)
    bench.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(bench.work, ignore_errors=True)
    bench.work.mkdir(parents=True)
    os.environ.setdefault("TUNELAB_CACHE", str(bench.work / "cache"))
    import torch

    bench.results.update({"device": torch.cuda.get_device_name(0) if bench.on_gpu else f"CPU ({os.cpu_count()} cores)",
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    bench.log(f"device {bench.results['device']}, torch {torch.__version__}")
    model_dir = build_model(bench)
    bench.results["params"] = bench.params
    data = build_data(bench, model_dir)
    if "check" in groups:
        packing_check(bench, model_dir)
    if "hf" in groups:
        run_hf(bench, model_dir, data)
    if "tunelab" in groups:
        run_tunelab(bench, model_dir, data)
    if "dpo" in groups:
        run_dpo(bench, model_dir)
    if "profile" in groups:
        run_profile(bench, model_dir, data)
    bench.save()
    section = results_section(bench, " ".join(sys.argv[1:]))
    (bench.out / "section.md").write_text(section)
    if args.preset != "smoke":
        with (REPO / "benchmarks" / "RESULTS.md").open("a") as handle:
            handle.write("\n" + section)
    print(section, flush=True)


def results_section(bench: Bench, arguments: str) -> str:
    """The benchmarks/RESULTS.md section of this run: card, date, command, versions, checks and the table."""
    import peft
    import transformers

    r = bench.results
    lines = [f"## gpu_sft — {r['date']}, {r['device']}", "",
             f"- command: `python benchmarks/gpu_sft.py {arguments}`; torch {r['torch']}, transformers "
             f"{transformers.__version__}, peft {peft.__version__}",
             f"- model: random Llama, {bench.params:,} parameters; data: {r.get('data')}; MFU against "
             f"{bench.peak_tflops:g} TFLOP/s"]
    if "packing_check" in r:
        lines.append(f"- packing check (one row of 4 sequences vs each alone): {r['packing_check']}")
    if "fast_vs_plain" in r:
        lines.append(f"- fast vs plain path, same seed: {r['fast_vs_plain']}")
    if "liger" in r:
        lines.append(f"- {r['liger']}")
    return "\n".join(lines) + "\n\n" + bench.table() + "\n"


if __name__ == "__main__":
    main()
