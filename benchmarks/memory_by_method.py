"""Peak training memory per fine-tuning method on the same model: full, freeze, LoRA, QLoRA, prefix, prompt.

Every method runs in its own fresh process on the same randomly initialised Llama, with the same
batches (``--batch`` sequences of ``--seq-len`` random tokens, every token trained, padded layout so
prefix/prompt tuning see the same inputs), AdamW and ``--steps`` optimizer steps, through
tunelab's own pieces (``load_model`` with ``model.quantization``, ``apply_method``, the engine's
optimizer and loss). Gradient checkpointing is off for all.

What is measured:

- CPU (default): "training peak" = the weights' exact bytes + how far resident memory grew
  above its level after loading while training ran (gradients, optimizer state, activations,
  allocator slack; the high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs``
  once the model is loaded and every weight has been touched). Weights are counted exactly
  rather than by RSS because transformers maps unquantized safetensors weights from the file
  (page cache, shared, resident only once touched) while a quantized load reads the file and
  keeps its pages cached: RSS would count the checkpoint for one and not the other. "Load
  peak" = the high-water mark while loading and applying the method, minus the resident memory
  after the imports (it includes those cached file pages). Weights load in float32 as the
  engine does on a CPU (so QLoRA's 4-bit base is compared with a float32 LoRA base); QLoRA's
  matmuls run in float32 (``quant_compute_dtype: auto`` on a CPU without fast bf16).
- CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` (tensors only, not the caching
  allocator's reserve), the same two phases; frozen bases load in bf16 as the engine does,
  full/freeze in float32 with bf16 autocast.

Also reported: the weights' own memory (``tunelab.models.quant.weight_memory``), trainable
parameters and seconds per step (only comparable within one run).

Usage::

    python benchmarks/memory_by_method.py                  # ~0.1B model, appends to benchmarks/RESULTS.md
    python benchmarks/memory_by_method.py --quick --no-write   # smoke check (tiny model, seconds)
    python benchmarks/memory_by_method.py --device cuda --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \\
        --intermediate 8192 --vocab 32000 --seq-len 2048   # 1B-shaped, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from sft_throughput import versions  # noqa: E402
METHODS = {
    "full": {"type": "full"},
    "freeze (last 2 layers)": {"type": "freeze", "trainable_layers": 2},
    "LoRA r16": {"type": "lora", "rank": 16, "alpha": 32},
    "QLoRA r16 (NF4)": {"type": "qlora", "rank": 16, "alpha": 32},
    "prefix (20 tokens)": {"type": "prefix", "num_virtual_tokens": 20},
    "prompt (20 tokens)": {"type": "prompt", "num_virtual_tokens": 20},
}
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def rss_bytes() -> int:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The resident-memory high-water mark (VmHWM) of this process."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Set the high-water mark back to the current resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure_one(model_dir: str, method: dict, device_name: str, steps: int, batch: int, seq_len: int,
                vocab: int) -> dict:
    """Train one method for ``steps`` steps in this process and return its memory figures."""
    import torch

    from tunelab.config import ModelConfig, TrainConfig, method_config
    from tunelab.data.packing import collate_padded
    from tunelab.models.adapters import count_parameters
    from tunelab.models.methods import apply_method, method_spec
    from tunelab.models.load import load_model, resolve_load_dtype
    from tunelab.models.quant import weight_memory
    from tunelab.train.objectives.sft import causal_lm_loss
    from tunelab.train.optim import build_optimizer

    import peft  # noqa: F401  (imported before the baseline: code is not training memory)
    import transformers.models.llama.modeling_llama  # noqa: F401

    if method.get("type") == "qlora":
        import bitsandbytes  # noqa: F401

    device = torch.device(device_name)
    on_gpu = device.type == "cuda"

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if on_gpu else peak_rss_bytes() - baseline

    def reset_peak() -> None:
        torch.cuda.reset_peak_memory_stats(device) if on_gpu else reset_peak_rss()

    baseline = rss_bytes()
    reset_peak()
    method_cfg = method_config(**method)
    model_cfg = ModelConfig(path=model_dir, quantization="4bit" if method_cfg.needs_quantized_base else "none")
    dtype = resolve_load_dtype(model_cfg, not method_spec(method_cfg.type).trains_base, device)
    model = load_model(model_cfg, dtype, device)
    model = apply_method(model, method_cfg)
    weights = weight_memory(model)  # after apply_method: adapters and k-bit upcasts included
    model.train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4), None)
    generator = torch.Generator().manual_seed(0)
    examples = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(3, vocab, (batch, seq_len), generator=generator).tolist()
    ]
    inputs = collate_padded(examples, pad_id=0).to(device)
    with torch.no_grad():
        for parameter in model.parameters():  # page every weight in before the training phase
            parameter.float().sum() if parameter.is_floating_point() else parameter.sum()
    load_peak = peak()
    after_load = 0 if on_gpu else rss_bytes()
    reset_peak()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    # Bytes autograd keeps for backward (first step): exact, whatever the allocator does. Weights
    # that the graph keeps (for input gradients) are not activations and are left out.
    weight_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weight_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    times = []
    for step in range(steps):
        start = time.perf_counter()
        recording = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if step == 0 else nullcontext()
        with recording, (autocast() if autocast is not None else nullcontext()):
            loss = causal_lm_loss(model, inputs) / inputs.num_trained
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    train_peak = peak() if on_gpu else weights.actual_bytes + peak_rss_bytes() - after_load
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer_state = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    return {
        "peak_bytes": train_peak,
        "load_peak_bytes": load_peak,
        "state_bytes": weights.actual_bytes + gradients + optimizer_state,
        "saved_activation_bytes": sum(saved.values()),
        "weights_bytes": weights.actual_bytes,
        "trainable": count_parameters(model).trainable,
        "total": count_parameters(model).total,
        "s_per_step": min(times[1:] or times),
        "loss": float(loss),
    }


def build_model(path: Path, args: argparse.Namespace) -> int:
    """A randomly initialised Llama saved as safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def table(results: dict[str, dict], params: int) -> str:
    """The Markdown table, with each method's peak relative to full fine-tuning."""
    full = results.get("full", {}).get("peak_bytes")
    lines = [
        "| method | trainable params | weights MiB | weights + grads + AdamW MiB | saved activations MiB "
        "| training peak MiB | vs full | peak bytes/param | load peak MiB | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | | | | |")
            continue
        ratio = f"{row['peak_bytes'] / full:.2f}x" if full else ""
        lines.append(
            f"| {name} | {row['trainable']:,} | {mib(row['weights_bytes'])} | {mib(row['state_bytes'])} "
            f"| {mib(row['saved_activation_bytes'])} "
            f"| {mib(row['peak_bytes'])} | {ratio} "
            f"| {row['peak_bytes'] / params:.2f} | {mib(row['load_peak_bytes'])} | {row['s_per_step']:.2f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Peak training memory per method on the same model.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names from the table")
    parser.add_argument("--quick", action="store_true", help="smoke check: a tiny model, 2 steps")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: JSON of (model_dir, method name)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 4, 2
        args.intermediate, args.vocab, args.seq_len, args.batch, args.steps = 128, 1000, 64, 2, 2
    return args


def main() -> int:
    args = parse_args()
    if args.one:
        job = json.loads(args.one)
        result = measure_one(job["model"], METHODS[job["method"]], args.device, args.steps, args.batch, args.seq_len,
                             args.vocab)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    names = [name.strip() for name in args.methods.split(",")]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "model"
        params = build_model(model_dir, args)
        print(f"model: {params:,} parameters at {model_dir}", flush=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        for name in names:
            command = [sys.executable, __file__, "--one", json.dumps({"model": str(model_dir), "method": name}),
                       *sys.argv[1:]]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                results[name] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:120]}
            else:
                results[name] = json.loads(line.removeprefix("RESULT "))
            print(f"{name}: {results[name]}", flush=True)
    what = ("exact weight bytes + growth of resident memory (VmHWM) above its level after loading; load peak = "
            "VmHWM while loading minus RSS after the imports (includes the checkpoint's cached file pages)"
            if args.device == "cpu" else "torch.cuda.max_memory_allocated, reset between loading and training")
    text = "\n".join([
        f"## memory_by_method — {time.strftime('%a %b %d %H:%M:%S UTC %Y', time.gmtime())}",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; device {args.device}",
        f"- command: `python benchmarks/memory_by_method.py {' '.join(sys.argv[1:])}`",
        f"- versions: {versions(PACKAGES)}",
        f"- model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV "
        f"heads, MLP {args.intermediate}, vocab {args.vocab}, untied head: {params:,} parameters",
        f"- batch: {args.batch} x {args.seq_len} tokens, every token trained; AdamW; {args.steps} steps; "
        "no gradient checkpointing",
        f"- peak = {what}; weights = the weights' own memory after the method is applied (4-bit with its "
        "quantization constants, adapters, k-bit preparation's float32 upcasts); weights + grads + AdamW = "
        "exact tensor bytes; saved activations = exact bytes autograd keeps for backward (first step, "
        "weights excluded)",
        "",
        table(results, params),
        "",
    ])
    print(text)
    if not args.no_write and not args.quick:
        path = REPO / "benchmarks" / "RESULTS.md"
        with path.open("a") as handle:
            handle.write("\n" + text)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
