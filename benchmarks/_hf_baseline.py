"""The plain Hugging Face + PEFT SFT recipe that ``sft_throughput.py`` measures tunelab against.

This is the loop most fine-tuning scripts and tutorials write by hand: AutoTokenizer +
AutoModelForCausalLM + ``peft.get_peft_model``, ``tokenizer.apply_chat_template`` per record,
labels masking the prompt (and the padding) with -100, a torch ``DataLoader`` of batch size 8,
AdamW with warmup + cosine decay, and

    for batch in loader:
        loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()

Three batching variants:

* ``max_length``: every record padded to ``--max-length`` (``padding="max_length"``), the
  recipe of many tutorials;
* ``dynamic``: each batch padded to its longest record (``DataCollatorForSeq2Seq``);
* ``flatten``: padding-free packing as transformers offers it (``DataCollatorWithFlattening``:
  the batch's records in one row, ``position_ids`` restarting per record, SDPA with the block
  mask transformers builds from them).

``--full`` trains every weight instead of LoRA; ``--liger`` patches the model with liger-kernel's
Triton kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) before loading, when installed.

It is run as its own process by ``sft_throughput.py`` (so import and load time count) and writes
a JSON summary (steps, tokens, per-step losses) to ``--result``. It deliberately imports nothing
from tunelab. Run it alone with ``python benchmarks/_hf_baseline.py --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

IGNORE_INDEX = -100


def alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """One alpaca record as chat messages (user = instruction, a blank line, then input if any)."""
    instruction, extra = record.get("instruction") or "", record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def tokenize_record(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int, pad_to_max: bool
) -> dict[str, list[int]]:
    """Chat-template one record; labels are -100 on the prompt and on padding.

    The prompt is the conversation up to and including the assistant header
    (``add_generation_prompt=True``); everything after it (the answer and its end-of-turn
    token) is trained.

    Args:
        tokenizer: tokenizer with a chat template and a pad token.
        record: an alpaca record (instruction, input, output).
        max_length: truncate (and, with ``pad_to_max``, pad) to this many tokens.
        pad_to_max: pad with ``padding="max_length"``; otherwise leave unpadded.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` of equal length.
    """
    messages = alpaca_messages(record)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    encoded = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        truncation=True,
        max_length=max_length,
        padding="max_length" if pad_to_max else False,
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["attention_mask"])
    prompt_len = len(prompt["input_ids"])
    labels = [
        IGNORE_INDEX if k < prompt_len or not keep else token for k, (token, keep) in enumerate(zip(ids, mask))
    ]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_to_max_collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Stack already padded examples into tensors."""
    return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "attention_mask", "labels")}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every plain HF+PEFT baseline shares: optimizer, LoRA, device and precision, outputs."""
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 base weights and bf16 autocast (GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--output-dir", required=True, help="where the adapter is saved")
    parser.add_argument("--result", required=True, help="JSON summary to write")


def main() -> None:
    """Train one epoch of LoRA SFT with the plain loop and write the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--data", required=True, help="alpaca JSON file")
    parser.add_argument("--records", type=int, default=None, help="use only the first N records")
    parser.add_argument("--padding", choices=["max_length", "dynamic", "flatten"], required=True)
    parser.add_argument("--full", action="store_true", help="train all weights (no LoRA)")
    parser.add_argument("--liger", action="store_true", help="apply liger-kernel's Llama kernels (GPU)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    add_training_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.records]
    pad_to_max = args.padding == "max_length"
    examples = [tokenize_record(tokenizer, r, args.max_length, pad_to_max) for r in records]
    if pad_to_max:
        collate = pad_to_max_collate
    elif args.padding == "flatten":
        flatten = DataCollatorWithFlattening()
        collate = lambda batch: flatten([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in batch])  # noqa: E731
    else:
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    loader = DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )

    device = torch.device(args.device)
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    # Full fine-tuning keeps fp32 master weights under bf16 autocast, as mixed-precision training does.
    weights_dtype = torch.bfloat16 if args.bf16 and not args.full else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=weights_dtype, attn_implementation="sdpa")
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    if not args.full:
        model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    total_steps = min(len(loader), args.max_steps or len(loader))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)

    losses: list[float] = []
    step_seconds: list[float] = []
    step_real_tokens: list[int] = []
    real_tokens = computed_tokens = trained_tokens = 0
    train_start = time.perf_counter()
    for batch in loader:
        if len(losses) == total_steps:
            break
        step_start = time.perf_counter()
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - step_start)
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        step_real_tokens.append(real)
        real_tokens += real
        computed_tokens += batch["input_ids"].numel()
        trained_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        if len(losses) % 10 == 0 or len(losses) == total_steps:
            print(f"step {len(losses)}/{total_steps}: loss {losses[-1]:.4f}", flush=True)
    train_s = time.perf_counter() - train_start
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    summary = {
        "recipe": f"hf_{args.padding}" + ("_full" if args.full else "") + ("_liger" if args.liger else ""),
        "steps": total_steps,
        "records": len(examples),
        "real_tokens": real_tokens,
        "computed_tokens": computed_tokens,
        "trained_tokens": trained_tokens,
        "losses": losses,
        "precision": "bf16" if args.bf16 else "fp32",
        "step_seconds": step_seconds,
        "step_real_tokens": step_real_tokens,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "train_loop_s": train_s,
        "in_process_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
