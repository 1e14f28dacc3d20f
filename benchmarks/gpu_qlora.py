"""One prepared GPU run: QLoRA (4-bit NF4 base) against LoRA on a bf16 base, tokens/s and peak memory.

On one CUDA GPU, about 3-4 minutes on an H100/H200 (well under 8), in one process tree:

1. builds a randomly initialised Llama of the Llama-3.2-1B shape (hidden 2048, 16 layers, 32
   heads, 8 KV heads, MLP 8192, tied embeddings; vocabulary 32,000: 1.04B parameters) and saves
   it as bf16 safetensors;
2. for each recipe, in its own process (fresh CUDA memory statistics): load the base through
   tunelab (``load_model`` with ``model.quantization``), add LoRA r16 on all linear layers
   (``apply_method``; QLoRA's base is prepared for k-bit training), AdamW, bf16 autocast, then
   ``--steps`` optimizer steps of ``--batch`` x ``--seq-len`` random tokens (every token trained);
   tokens/s over the steps after ``--warmup``, ``torch.cuda.max_memory_allocated`` and
   ``max_memory_reserved``, the weights' own memory, first and last loss;
3. recipes: ``lora-bf16`` and ``qlora-nf4`` (double quantization, bf16 compute), each with and
   without gradient checkpointing.

Run on the GPU machine::

    python benchmarks/gpu_qlora.py --out $OUT

It writes ``results.json``, ``table.md`` and ``runs.log`` (every recipe's output) under ``--out``
and prints the table; copy the table and the card into benchmarks/RESULTS.md.
``--smoke`` runs the same script on a CPU with a tiny model (a check of the script, not a
measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "lora-bf16": {"quantization": "none", "gradient_checkpointing": False},
    "lora-bf16 + GC": {"quantization": "none", "gradient_checkpointing": True},
    "qlora-nf4": {"quantization": "4bit", "gradient_checkpointing": False},
    "qlora-nf4 + GC": {"quantization": "4bit", "gradient_checkpointing": True},
}
SHAPE_1B = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000}
SHAPE_SMOKE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1000}


def log(text: str) -> None:
    """Print with a timestamp, unbuffered."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_model(path: Path, shape: dict, seq_len: int) -> int:
    """A random Llama saved as bf16 safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
        max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=True, rope_theta=500000.0,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def run_recipe(model_dir: str, recipe: dict, device_name: str, steps: int, warmup: int, batch: int,
               seq_len: int) -> dict:
    """Train one recipe in this process; return its speed and memory."""
    import torch

    from tunelab.config import ModelConfig, TrainConfig, method_config
    from tunelab.data.packing import collate_padded
    from tunelab.models.adapters import count_parameters, enable_gradient_checkpointing
    from tunelab.models.methods import apply_method
    from tunelab.models.load import load_model
    from tunelab.models.quant import weight_memory
    from tunelab.train.objectives.sft import causal_lm_loss
    from tunelab.train.optim import build_optimizer

    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    compute = "bfloat16" if on_gpu else "float32"
    model_cfg = ModelConfig(path=model_dir, quantization=recipe["quantization"], quant_compute_dtype=compute)
    model = load_model(model_cfg, torch.bfloat16 if on_gpu else torch.float32, device)
    weights = weight_memory(model)
    model = apply_method(model, method_config(type="qlora" if recipe["quantization"] != "none" else "lora",
                                              rank=16, alpha=32))
    if recipe["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4), None)
    vocab = model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def batch_of_random_tokens():
        ids = torch.randint(3, vocab, (batch, seq_len), generator=generator).tolist()
        return collate_padded([{"input_ids": row, "labels": row} for row in ids], pad_id=0).to(device)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)
    losses, started = [], None
    for step in range(steps):
        if step == warmup:
            if on_gpu:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        inputs = batch_of_random_tokens()
        with autocast:
            loss = causal_lm_loss(model, inputs) / inputs.num_trained
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # .item() syncs, as a real loop's logging does
    if on_gpu:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    counted = (steps - warmup) * batch * seq_len
    return {
        "tokens_per_s": counted / elapsed,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if on_gpu else None,
        "weights_gib": weights.actual_bytes / 2**30,
        "trainable": count_parameters(model).trainable,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def table(results: dict[str, dict], params: int, args: argparse.Namespace) -> str:
    """Markdown table; ratios against lora-bf16."""
    base = results.get("lora-bf16", {})
    lines = [
        f"model: random Llama, {'tiny (smoke run)' if args.smoke else 'Llama-3.2-1B shape'}, {params:,} parameters; "
        f"batch {args.batch} x {args.seq_len} tokens; "
        f"{args.steps} steps, tokens/s over the last {args.steps - args.warmup}",
        "",
        "| recipe | tokens/s | vs lora-bf16 | peak allocated GiB | peak reserved GiB | weights GiB | first -> last loss |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | |")
            continue
        speed = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if "tokens_per_s" in base else ""
        peak = row["peak_allocated_gib"]
        reserved = row["peak_reserved_gib"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:,.0f} | {speed} | {'' if peak is None else f'{peak:.2f}'} | "
            f"{'' if reserved is None else f'{reserved:.2f}'} | {row['weights_gib']:.3f} | "
            f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} |"
        )
    return "\n".join(lines)


def card() -> str:
    """The GPU's name and the versions that decide the numbers."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (smoke run)"
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "not installed"
    return f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}, bitsandbytes {bnb}"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="QLoRA vs bf16 LoRA on a 1B-shaped Llama: tokens/s and memory.")
    parser.add_argument("--out", type=Path, required=True, help="where results.json, table.md and runs.log go")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=150, help="seconds allowed per recipe")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch, args.seq_len = 3, 1, 2, 64
    return args


def main() -> int:
    args = parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.one:
        job = json.loads(args.one)
        result = run_recipe(job["model"], RECIPES[job["recipe"]], device, args.steps, args.warmup, args.batch,
                            args.seq_len)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "runs.log"
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        params = build_model(model_dir, SHAPE_SMOKE if args.smoke else SHAPE_1B, args.seq_len)
        log(f"built a {params:,}-parameter model")
        for name in RECIPES:
            command = [sys.executable, __file__, "--one", json.dumps({"model": str(model_dir), "recipe": name}),
                       *sys.argv[1:]]
            with log_file.open("a") as handle:
                handle.write(f"\n===== {name}\n")
                handle.flush()
                try:
                    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=REPO,
                                          timeout=args.timeout)
                    handle.write(done.stdout)
                    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    results[name] = (json.loads(line.removeprefix("RESULT ")) if done.returncode == 0 and line
                                     else {"error": f"exit {done.returncode}, see runs.log"})
                except subprocess.TimeoutExpired:
                    results[name] = {"error": f"over {args.timeout:.0f} s"}
            log(f"{name}: {results[name]}")
            (args.out / "results.json").write_text(json.dumps({"card": card(), "results": results}, indent=1))
    text = f"card: {card()}\n\n" + table(results, params, args) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)
    return 0 if all("error" not in row for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
