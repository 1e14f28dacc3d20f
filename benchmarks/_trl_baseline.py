"""TRL's ``SFTTrainer`` with ``padding_free=True``: the baseline ``real_sft.py`` measures tunelab against.

The recipe a TRL user writes for LoRA SFT: the records as conversational prompt-completion pairs
(so only the completion, i.e. the assistant answer and its end-of-turn token, is trained),
``SFTConfig(padding_free=True)`` (each batch flattened into one row with ``position_ids``
restarting per record: TRL's fastest setting short of packing), a PEFT ``LoraConfig``, AdamW with
warmup and cosine decay, gradient clipping. Records longer than ``max_length`` must be removed
beforehand (padding-free without packing does not truncate); ``real_sft.py`` gives every recipe
the same records, all of which fit.

It is run as its own process by ``real_sft.py`` (imports and loading count) and writes a JSON
summary (steps, tokens, per-step losses) to ``--result``. It imports nothing from tunelab.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from _hf_baseline import add_training_arguments, alpaca_messages


class StepLog(TrainerCallback):
    """Keeps each optimizer step's training loss and the tokens it saw."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    """Train one epoch with SFTTrainer(padding_free=True) and write the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="alpaca JSON file")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    add_training_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.records]
    rows = []
    for record in records:
        messages = alpaca_messages(record)
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    dataset = Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=args.output_dir, num_train_epochs=1, max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the steps
        weight_decay=0.0, max_grad_norm=args.max_grad_norm, bf16=args.bf16,
        padding_free=True, max_length=None, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        data_seed=args.seed, use_cpu=args.device == "cpu", dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing, dataset_num_proc=None,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    log = StepLog()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[log])
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start
    trainer.save_model(args.output_dir)

    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trained = sum(sum(mask) for mask in trainer.train_dataset["completion_mask"]) \
        if "completion_mask" in trainer.train_dataset.column_names else None
    summary = {
        "recipe": "trl_padding_free", "steps": len(log.losses), "records": len(dataset),
        "real_tokens": tokens, "computed_tokens": tokens, "trained_tokens": trained, "losses": log.losses,
        "precision": "bf16" if args.bf16 else "fp32", "train_loop_s": train_s,
        "in_process_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
