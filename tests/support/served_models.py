"""Models for the server's tests and what they must answer: a random LoRA adapter, the greedy answer unserved."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab.eval.generate import generate_answers


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on every linear layer of ``base_dir`` with random (not zero) weights, saved to ``out``."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    return out


def greedy(model, tokenizer, messages, max_new_tokens=16) -> str:
    """The greedy answer to ``messages`` as training's evaluation generates it (train/serve parity's reference)."""
    return generate_answers(model, tokenizer, tokenizer.chat_template, [messages], max_new_tokens, 1)[0]
