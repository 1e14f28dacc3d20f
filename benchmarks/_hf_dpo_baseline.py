"""The plain Hugging Face + PEFT DPO recipe (TRL's padded DPOTrainer loop) that tunelab's DPO is measured against.

This is what TRL's ``DPOTrainer`` runs for a LoRA policy, written out by hand with transformers +
PEFT so that nothing but the recipe itself is timed:

* data: preference records with ``prompt``/``chosen``/``rejected`` (each text or a list of
  messages; text prompts become one user message, text answers one assistant message), or
  LLaMA-Factory's sharegpt pairs (``conversations`` + ``chosen``/``rejected`` turns). The prompt
  is rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; a
  completion is what the rendered full conversation (prompt + answer) has after the prompt's
  tokens, so it ends exactly as the template ends the turn;
* truncation as TRL: prompt + completion is cut to ``--max-length`` keeping the start, a pair
  whose prompt alone fills ``--max-length`` is dropped, and ``--max-prompt-length`` (older TRL
  releases) keeps only the prompt's last tokens;
* ``peft.get_peft_model`` with LoRA on all linear layers; the reference model is the same model
  inside ``with model.disable_adapter():`` under ``torch.no_grad()`` (TRL's PEFT behaviour: no
  second copy of the weights);
* per batch of ``--batch-size`` pairs, the chosen and the rejected sequences are concatenated
  into one batch of ``2 * batch_size`` rows (chosen rows first), right-padded to the longest row
  with an attention mask, and scored by one policy forward and one reference forward:

      logps = sum over completion tokens of log_softmax(logits[:, :-1])[labels[:, 1:]]
      loss = mean(-logsigmoid(beta * ((pc - rc) - (pr - rr))))
      loss.backward(); clip; opt.step(); sched.step(); opt.zero_grad()

  with AdamW and warmup + cosine decay. Log-probs are gathered as TRL's pure-torch path does
  (``logits - logsumexp`` per row for float32 logits, a per-row float32 ``log_softmax`` for
  bf16 logits); TRL's fused Triton log-prob kernel (used on CUDA when Triton is installed) is
  not.

It is run as its own process by the GPU benchmark (so import and load time count) and writes a
JSON summary to ``--result``: per-step seconds, real (non-pad) tokens, computed tokens
(including padding), losses and TRL's reward metrics (``rewards/chosen`` = beta * (policy -
reference) log-prob of the chosen completion, and so on). It deliberately imports nothing from
tunelab (only the shared options of ``_hf_baseline.py``). Run it alone with ``python benchmarks/_hf_dpo_baseline.py --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from _hf_baseline import add_training_arguments  # this script's folder is on sys.path

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool"}


def read_records(path: str) -> list[dict[str, Any]]:
    """A JSON list of records, or JSONL (one record a line)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """Text (one message of ``role``), one message, or a list of messages (role/content or from/value)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    items = [value] if isinstance(value, dict) else value
    return [{"role": SHAREGPT_ROLES[m.get("role", m.get("from"))], "content": m.get("content", m.get("value"))}
            for m in items]


def pair_messages(record: dict[str, Any]) -> tuple[list[dict[str, str]], ...]:
    """(prompt, chosen, rejected) message lists of one preference record."""
    if "conversations" in record:  # LLaMA-Factory sharegpt preference
        prompt = as_messages(record["conversations"], "user")
        if record.get("system"):
            prompt.insert(0, {"role": "system", "content": record["system"]})
    else:
        prompt = as_messages(record["prompt"], "user")
    return prompt, as_messages(record["chosen"], "assistant"), as_messages(record["rejected"], "assistant")


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int, max_prompt_length: int | None
) -> dict[str, list[int]] | None:
    """Chat-template one pair into prompt, chosen and rejected token ids (TRL's tokenize step).

    The prompt ends with the assistant header (``add_generation_prompt=True``); each completion
    is the rest of the rendered full conversation. ``prompt + completion`` is truncated to
    ``max_length`` keeping the start.

    Args:
        tokenizer: tokenizer with a chat template.
        record: a preference record (see the module docstring).
        max_length: longest prompt + completion, in tokens.
        max_prompt_length: if set, keep only the prompt's last this many tokens.

    Returns:
        ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``; None when the prompt alone fills
        ``max_length`` (TRL drops such pairs: no completion token would be left).
    """
    prompt, chosen, rejected = pair_messages(record)

    def ids(messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(encoded["input_ids"])

    prompt_ids = ids(prompt, generation_prompt=True)
    chosen_ids = ids(prompt + chosen)[len(prompt_ids):]
    rejected_ids = ids(prompt + rejected)[len(prompt_ids):]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:room], "rejected_ids": rejected_ids[:room]}


def collate_pairs(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to the longest: ids, attention and completion masks."""
    rows = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
    rows += [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    completions = [len(e["chosen_ids"]) for e in examples] + [len(e["rejected_ids"]) for e in examples]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (row, completion) in enumerate(zip(rows, completions)):
        input_ids[k, : len(row)] = torch.tensor(row)
        attention_mask[k, : len(row)] = 1
        completion_mask[k, len(row) - completion : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[labels]`` per position, computed row by row like TRL's torch path.

    float32 logits: ``logit - logsumexp``; bf16 logits: a ``log_softmax`` per row, in float32
    (what CUDA autocast does to TRL's ``log_softmax``; CPU autocast would keep bf16, whose
    resolution makes summed log-probs useless), so the result is float32 either way.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack(
        [row.float().log_softmax(-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) for row, lab in zip(logits, labels)]
    )


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of each row's completion tokens (one forward of the padded batch)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    per_token = token_logps(logits[:, :-1], batch["input_ids"][:, 1:])
    return per_token.masked_fill(batch["completion_mask"][:, 1:] == 0, 0.0).sum(dim=1)


def dpo_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss (mean over pairs) of a concatenated batch, and TRL's reward metrics.

    The policy is ``model``; the reference is ``model`` with its LoRA adapters disabled.
    """
    pc, pr = sequence_logps(model, batch).chunk(2)
    with torch.no_grad(), model.disable_adapter():
        rc, rr = sequence_logps(model, batch).chunk(2)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": pc.detach().mean().item(),
        "logps/rejected": pr.detach().mean().item(),
    }
    return loss, metrics


def main() -> None:
    """Train LoRA DPO with the plain padded loop and write the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--data", required=True, help="preference JSON or JSONL file")
    parser.add_argument("--records", type=int, default=None, help="use only the first N records")
    parser.add_argument("--max-length", type=int, default=1024, help="longest prompt + completion (TRL's max_length)")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="keep only the prompt's last N tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (2x rows per forward)")
    parser.add_argument("--beta", type=float, default=0.1)
    add_training_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = read_records(args.data)[: args.records]
    tokenized = [tokenize_pair(tokenizer, r, args.max_length, args.max_prompt_length) for r in records]
    examples = [e for e in tokenized if e is not None]
    loader = DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(args.seed),
    )

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
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
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    total_steps = min(len(loader), args.max_steps or len(loader))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)

    losses: list[float] = []
    step_seconds: list[float] = []
    step_real_tokens: list[int] = []
    step_computed_tokens: list[int] = []
    step_metrics: dict[str, list[float]] = {}
    real_tokens = computed_tokens = trained_tokens = 0
    train_start = time.perf_counter()
    for batch in loader:
        if len(losses) == total_steps:
            break
        step_start = time.perf_counter()
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, metrics = dpo_loss(model, batch, args.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - step_start)
        for name, value in metrics.items():
            step_metrics.setdefault(name, []).append(value)
        step_real_tokens.append(int(batch["attention_mask"].sum()))
        step_computed_tokens.append(batch["input_ids"].numel())
        real_tokens += step_real_tokens[-1]
        computed_tokens += step_computed_tokens[-1]
        trained_tokens += int(batch["completion_mask"][:, 1:].sum())
        if len(losses) % 10 == 0 or len(losses) == total_steps:
            print(f"step {len(losses)}/{total_steps}: loss {losses[-1]:.4f} "
                  f"rewards/accuracy {metrics['rewards/accuracy']:.2f}", flush=True)
    train_s = time.perf_counter() - train_start
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    summary = {
        "recipe": "hf_dpo_padded",
        "steps": total_steps,
        "records": len(records),
        "pairs": len(examples),
        "dropped_pairs": len(records) - len(examples),
        "batch_size": args.batch_size,
        "beta": args.beta,
        "real_tokens": real_tokens,
        "computed_tokens": computed_tokens,
        "trained_tokens": trained_tokens,
        "losses": losses,
        "step_metrics": step_metrics,
        "precision": "bf16" if args.bf16 else "fp32",
        "step_seconds": step_seconds,
        "step_real_tokens": step_real_tokens,
        "step_computed_tokens": step_computed_tokens,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "train_loop_s": train_s,
        "in_process_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
