"""Peak memory and time of one training step with the full logits vs the chunked loss (train.chunked_loss).

Each setting runs in its own process (peak resident memory is per process) on a random-init
Llama with a large vocabulary, where the logits dominate: one packed row of ``--tokens`` trained
tokens, forward + backward, LoRA on all linear layers. Prints a table and appends it to
benchmarks/RESULTS.md.

    python benchmarks/chunked_loss.py [--tokens 8192] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def one_step(setting: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    """Build the model, run one forward + backward, report peak RSS and time (runs in a child process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.data.packing import collate_packed
    from tunelab.models.attention import register_packed_sdpa
    from tunelab.train.objectives.sft import chunked_causal_lm_loss
    from tunelab.train.objectives.sft import causal_lm_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=tokens)
    config._attn_implementation = register_packed_sdpa()
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, target_modules="all-linear"))
    ids = torch.randint(3, vocab, (tokens,)).tolist()
    batch = collate_packed([{"input_ids": ids[k : k + 1024], "labels": ids[k : k + 1024]}
                            for k in range(0, tokens, 1024)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = chunked_causal_lm_loss(model, batch, chunk) if setting == "chunked" else causal_lm_loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"setting": setting, "loss": loss.item(), "seconds": seconds, "peak_mib": peak / 1024,
            "step_mib": (peak - before) / 1024}


def main() -> None:
    """Run both settings in child processes, print the table, append it to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child, args.tokens, args.vocab, args.hidden, args.chunk)))
        return
    rows = []
    for setting in ("full", "chunked"):
        command = [sys.executable, __file__, "--child", setting, "--tokens", str(args.tokens), "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    lines = [
        f"## chunked_loss — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.2f}",
        f"- command: `python benchmarks/chunked_loss.py --tokens {args.tokens} --vocab {args.vocab} "
        f"--hidden {args.hidden} --chunk {args.chunk}`",
        f"- setup: random Llama (hidden {args.hidden}, 2 layers, vocab {args.vocab}), LoRA r16 all-linear, one "
        f"packed row of {args.tokens} trained tokens, one forward + backward, fp32 on CPU; the float32 logits "
        f"alone are {logits_mib:,.0f} MiB",
        "- peak MiB = the process's peak resident memory; step MiB = its growth during the step",
        "",
        "| loss computation | loss | step s | peak MiB | step MiB |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['setting']} | {r['loss']:.5f} | {r['seconds']:.2f} | {r['peak_mib']:,.0f} | {r['step_mib']:,.0f} |"
          for r in rows],
        "",
        f"- chunked vs full: step memory {rows[1]['step_mib'] / max(rows[0]['step_mib'], 1):.2f}x, "
        f"time {rows[1]['seconds'] / rows[0]['seconds']:.2f}x, loss difference "
        f"{abs(rows[1]['loss'] - rows[0]['loss']):.2e}",
        "",
    ]
    print("\n".join(lines))
    with RESULTS.open("a") as handle:
        handle.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
