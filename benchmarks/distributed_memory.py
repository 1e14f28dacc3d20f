"""Memory per process of each distributed strategy, measured on this machine (CPU, gloo).

A full fine-tune (AdamW, fp32: 16 bytes of weights, gradient and optimizer state per parameter)
of one tiny-architecture Llama runs a few optimizer steps in one process and in N processes with
each strategy (DDP, FSDP2, DeepSpeed ZeRO-1/2/3). Every process reports its peak resident memory
(VmHWM, which includes Python, torch and loading the whole model before sharding) and its
training-state bytes (its share of weights and optimizer state, read from the tensors it holds). The losses of every run are compared with the single process's. Appends a section to
benchmarks/RESULTS.md.

    python benchmarks/distributed_memory.py                  # hidden 768, 12 layers, 2 processes
    python benchmarks/distributed_memory.py --hidden 256 --layers 4 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA = REPO.parent / "shared" / "data" / "llamafactory_demo" / "alpaca_en_demo.json"
RUNS = [("one process", "none", {}), ("DDP", "ddp", {}), ("FSDP2", "fsdp", {}),
        ("ZeRO-1", "deepspeed", {"zero_stage": 1}), ("ZeRO-2", "deepspeed", {"zero_stage": 2}),
        ("ZeRO-3", "deepspeed", {"zero_stage": 3})]


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def held_state_bytes(parallel) -> int:
    """Bytes of weights and optimizer state (incl. DeepSpeed's fp32 master copy) this process holds.

    Each storage counts once: only this process's shards (DTensor local shards, ZeRO-3 partitions).
    Gradients are left out: they are freed after each step and shard like the optimizer state.
    """
    import torch
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [p.ds_tensor if hasattr(p, "ds_tensor") else local(p) for p in parallel.model.parameters()]
    optimizer = parallel.engine.optimizer if getattr(parallel, "engine", None) is not None else parallel.measured_optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps torch's
    for group in inner.param_groups:
        tensors += [local(p) for p in group["params"]]
    for state in inner.state.values():
        tensors += [local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def measuring(cls):
    """A subclass of a strategy that records this process's training state after each step."""

    class Measured(cls):
        def attach(self, optimizer):
            super().attach(optimizer)
            self.measured_optimizer = optimizer

        def clip_and_step(self, *args):
            norm = super().clip_and_step(*args)
            MEASURED["state_bytes"] = max(MEASURED.get("state_bytes", 0), held_state_bytes(self))
            return norm

    return Measured


MEASURED: dict = {}


def worker(config_path: str) -> None:
    """Run one training inside torchrun (or alone) and write this process's numbers."""
    from tunelab.config import load_config
    from tunelab.train import parallel as distributed, engine

    for name, cls in list(distributed.STRATEGIES.items()):
        distributed.STRATEGIES[name] = measuring(cls)
    start = time.perf_counter()
    config = load_config(config_path)
    engine.train(config)
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "peak_rss_mib": peak_rss_mib(), "state_mib": MEASURED.get("state_bytes", 0) / 2**20,
              "wall_s": time.perf_counter() - start}
    (Path(config.output_dir) / f"memory-rank{rank}.json").write_text(json.dumps(result))


def run(label: str, strategy: str, deepspeed: dict, args: argparse.Namespace, work: Path) -> dict:
    """One configuration: returns the per-process numbers and the logged losses."""
    out = work / label.replace(" ", "-")
    world = 1 if strategy == "none" else args.nproc
    config = {
        "model": {"path": str(work / "model"), "tiny": {"hidden": args.hidden, "layers": args.layers,
                                                        "heads": args.hidden // 64}},
        "method": {"type": "full"},
        "data": {"train": str(DATA), "max_length": 256, "max_samples": 64},
        "train": {"max_steps": args.steps, "lr": 1e-4, "batch_tokens": 512, "grad_accum": args.nproc // world,
                  "precision": "fp32", "log_every": 1, "seed": 0},
        "output_dir": str(out),
    }
    if strategy != "none":
        config["distributed"] = {"strategy": strategy, **({"deepspeed": deepspeed} if deepspeed else {})}
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    script = [str(Path(__file__).resolve()), "--worker", str(path)]
    command = ([sys.executable, *script] if strategy == "none" else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *script])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = work / f"{out.name}.log"
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed; see {log}")
    ranks = [json.loads((out / f"memory-rank{r}.json").read_text()) for r in range(world)]
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    return {"label": label, "ranks": ranks, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    os.environ.setdefault("TUNELAB_CACHE", tempfile.mkdtemp(prefix="tunelab-cache-"))
    with tempfile.TemporaryDirectory(prefix="tunelab-dist-mem-") as tmp:
        work = Path(tmp)
        results = []
        for label, strategy, deepspeed in RUNS:
            print(f"running {label} ...", flush=True)
            results.append(run(label, strategy, deepspeed, args, work))
        params = _parameters(work / "model")
    base = results[0]
    lines = [
        "| strategy | processes | training state per process (MiB) | peak RSS per process (MiB) | wall s "
        "| max loss diff vs one process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        state = " / ".join(f"{x['state_mib']:.0f}" for x in r["ranks"])
        rss = " / ".join(f"{x['peak_rss_mib']:.0f}" for x in r["ranks"])
        lines.append(f"| {r['label']} | {len(r['ranks'])} | {state} | {rss} | "
                     f"{max(x['wall_s'] for x in r['ranks']):.1f} | {diff:.1e} |")
    versions = ", ".join(f"{name} {_version(name)}" for name in ("torch", "transformers", "peft", "deepspeed"))
    section = "\n".join([
        f"## distributed_memory — {time.strftime('%a %b %d %H:%M:%S %Z %Y')}",
        "",
        f"- machine: {os.cpu_count()} cores, CPU only, gloo; one thread per process",
        f"- command: `python benchmarks/distributed_memory.py --hidden {args.hidden} --layers {args.layers} "
        f"--nproc {args.nproc} --steps {args.steps}`",
        f"- versions: {versions}",
        f"- setup: full fine-tune, fp32 weights, AdamW; tiny Llama hidden {args.hidden}, {args.layers} layers "
        f"({params:,} parameters, {params * 4 / 2**20:.0f} MiB of fp32 weights, so 16 bytes/parameter = "
        f"{params * 16 / 2**20:.0f} MiB of weights + gradients + Adam state); {args.steps} steps, the same "
        f"global batch in every run",
        "- training state = weights and optimizer state (with DeepSpeed's fp32 master partition) this process "
        "holds after a step, its shards only; gradients (freed after each step) shard like the optimizer state; "
        "peak RSS includes Python, torch and loading the whole model before sharding",
        "",
        *lines,
        "",
    ])
    print(section)
    if not args.no_write:
        with (BENCH_DIR / "RESULTS.md").open("a") as handle:
            handle.write("\n" + section)
    return 0


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
