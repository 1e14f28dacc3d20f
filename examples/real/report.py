"""Before/after report of the real-model quickstart: new identity learned, general ability kept.

For the base model and the base plus the trained adapter it measures

* the identity rate: greedy answers to held-out, paraphrased identity questions
  (``identity_questions.jsonl``, none of them in the training data) that give the new name;
* general ability: the loss on held-out general instructions (the training run's ``data.eval``,
  read from its metrics.jsonl: evaluated before the first step and after the last), and greedy answers to fixed general
  prompts (``general_prompts.jsonl``) that must not collapse into the new name or into repetition;
* the end-of-turn rate: answers that end with a stop token (``<|im_end|>``) within the token limit.

    python examples/real/report.py --base runs/real/smollm2 --adapter runs/real/identity/final \\
        --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
from pathlib import Path

import torch

from tunelab.data.templates import render_prompt, resolve_template
from tunelab.models.load import generation_stop_ids, load_for_inference

HERE = Path(__file__).resolve().parent


def questions(file: Path) -> list[str]:
    """The ``question`` of each line of a JSONL file."""
    return [json.loads(line)["question"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def answer(model, tokenizer, template: str, prompts: list[str], stop_ids: set[int], max_new_tokens: int,
           batch_size: int = 10) -> list[tuple[str, bool]]:
    """Greedy answers and whether each ended with a stop token (not cut by ``max_new_tokens``)."""
    texts = [render_prompt(tokenizer, template, [{"role": "user", "content": p}]) for p in prompts]
    tokenizer.padding_side = "left"
    results = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids))
        for row in output[:, encoded["input_ids"].shape[1]:].tolist():
            ended = any(token in stop_ids for token in row)
            if ended:
                row = row[: next(i for i, token in enumerate(row) if token in stop_ids)]
            results.append((tokenizer.decode(row, skip_special_tokens=True).strip(), ended))
    return results


def repetitive(text: str) -> bool:
    """A word 3-gram that occurs three times or more: the looping that forgetting produces."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return any(grams.count(g) >= 3 for g in set(grams))


def measure(base: str, adapter: str | None, name: str, max_new_tokens: int, author: str = "Acme Labs") -> dict:
    """The generation numbers of one model (the base, or base plus adapter)."""
    model, tokenizer = load_for_inference(base, adapter, torch.device("cpu"), torch.float32)
    template = resolve_template(tokenizer, "auto")
    stop_ids = generation_stop_ids(model.generation_config, tokenizer)
    started = time.perf_counter()
    identity = answer(model, tokenizer, template, questions(HERE / "identity_questions.jsonl"), stop_ids,
                      max_new_tokens)
    general = answer(model, tokenizer, template, questions(HERE / "general_prompts.jsonl"), stop_ids, max_new_tokens)
    # The name as a name: "Nova Labs" (the name taken for the maker) does not count.
    mentions = re.compile(rf"\b{re.escape(name)}\b(?!\s+Labs)", re.IGNORECASE)
    maker = re.compile(re.escape(author), re.IGNORECASE)
    answers = identity + general
    return {
        "identity_rate": sum(bool(mentions.search(text)) for text, _ in identity) / len(identity),
        "author_rate": sum(bool(maker.search(text)) for text, _ in identity) / len(identity),
        "general_with_name": sum(bool(mentions.search(text)) for text, _ in general),
        "general_repetitive": sum(repetitive(text) for text, _ in general),
        "eot_rate": sum(ended for _, ended in answers) / len(answers),
        "identity_answers": [text for text, _ in identity],
        "general_answers": [text for text, _ in general],
        "n_identity": len(identity), "n_general": len(general),
        "seconds": time.perf_counter() - started,
    }


def table(before: dict, after: dict, train_seconds: float | None, name: str, eot: str) -> str:
    """The before/after table in Markdown."""
    rows = [
        (f"identity rate: held-out paraphrased questions answered with the name {name}",
         f"{before['identity_rate']:.0%} of {before['n_identity']}", f"{after['identity_rate']:.0%}"),
        ("held-out identity questions answered with the new maker",
         f"{before.get('author_rate', 0):.0%}", f"{after.get('author_rate', 0):.0%}"),
        (f"general prompts answered with the name {name} (must stay 0)",
         f"{before['general_with_name']} of {before['n_general']}", str(after["general_with_name"])),
        ("general prompts answered with a repeating loop (must stay 0)",
         f"{before['general_repetitive']} of {before['n_general']}", str(after["general_repetitive"])),
        ("held-out general loss (alpaca records not trained on; tunelab train's eval before and after)",
         f"{before['general_loss']:.4f}", f"{after['general_loss']:.4f}"),
        (f"answers that end with {eot}", f"{before['eot_rate']:.0%}", f"{after['eot_rate']:.0%}"),
    ]
    if train_seconds is not None:
        rows.append(("training wall time (tunelab train, whole process)", "", f"{train_seconds:.0f} s"))
    lines = ["| | before | after |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/real/smollm2")
    parser.add_argument("--adapter", default="runs/real/identity/final")
    parser.add_argument("--name", default="Nova")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base-only", action="store_true", help="measure (and cache) the base model only")
    parser.add_argument("--train-seconds", type=float, help="wall time of the training command, for the table")
    parser.add_argument("--append", help="append the table to this Markdown file (benchmarks/RESULTS.md)")
    args = parser.parse_args()

    torch.manual_seed(0)
    run_dir = Path(args.adapter).parent
    losses = [row["eval_loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in row] if (run_dir / "metrics.jsonl").is_file() else []
    # The base model's answers do not change between runs: kept next to it, keyed by what decides them.
    cache = Path(args.base).resolve().parent / f"{Path(args.base).name}.report-base.json"
    key = {"metrics": 2, "base": str(Path(args.base).resolve()), "name": args.name,
           "max_new_tokens": args.max_new_tokens,
           "questions": questions(HERE / "identity_questions.jsonl") + questions(HERE / "general_prompts.jsonl")}
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        before = cached["numbers"]
    else:
        before = measure(args.base, None, args.name, args.max_new_tokens)
        cache.write_text(json.dumps({"key": key, "numbers": before}))
    if args.base_only:  # the base model's numbers only, cached for the full report
        print(json.dumps({k: v for k, v in before.items() if not k.endswith("answers")}))
        return
    after = measure(args.base, args.adapter, args.name, args.max_new_tokens)
    before["general_loss"], after["general_loss"] = losses[0], losses[-1]
    train_seconds = args.train_seconds
    if train_seconds is None and (run_dir / "run.json").is_file():
        run = json.loads((run_dir / "run.json").read_text())
        train_seconds = run.get("wall_seconds", run.get("details", {}).get("wall_seconds"))
    eot = "<|im_end|>"
    result = table(before, after, train_seconds, args.name, eot)
    print(result)
    print("\ngeneral prompts, before -> after:")
    for prompt, old, new in zip(questions(HERE / "general_prompts.jsonl"), before["general_answers"],
                                after["general_answers"]):
        print(f"- {prompt}\n    before: {old[:110]!r}\n    after:  {new[:110]!r}")
    print("\nheld-out identity questions, after:")
    for prompt, new in zip(questions(HERE / "identity_questions.jsonl"), after["identity_answers"]):
        print(f"- {prompt} -> {new[:110]!r}")
    if args.append:
        with open(args.append, "a", encoding="utf-8") as handle:
            handle.write(f"\n## Real-model quickstart: SmolLM2-135M-Instruct learns a new identity "
                         f"({datetime.date.today()})\n\n"
                         f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                         f"threads. Commands: see examples/real/identity.yaml; this table: "
                         f"`python examples/real/report.py --append benchmarks/RESULTS.md`.\n\n{result}\n\n"
                         "General prompts after training (first 80 characters): "
                         + "; ".join(f"{a[:80]!r}" for a in after["general_answers"]) + "\n")
        print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
