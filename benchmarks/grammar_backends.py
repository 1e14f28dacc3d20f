"""Constrained-decoding libraries for ``response_format`` on a CPU: which one the server should use.

Candidates: llguidance, xgrammar, outlines-core, lm-format-enforcer. For each: the time to prepare
a tokenizer, to compile a JSON schema, and to compute one next-token mask, and correctness: 50
random walks (seeded random logits, masked, sampled) must end in JSON that validates against the
schema. Install size and dependencies are read from the wheels by hand (see the RESULTS.md entry).
The candidates are not tunelab dependencies (only llguidance is); install the others for this run:

    pip install --no-deps --target /tmp/gcmp xgrammar apache-tvm-ffi outlines-core lm-format-enforcer interegular
    PYTHONPATH=/tmp/gcmp:src python benchmarks/grammar_backends.py --tokenizer DIR [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "tags", "mood"],
    "additionalProperties": False,
}


class Walker:
    """One library behind one interface: start a walk, allowed ids now, advance, finished."""

    def __init__(self, allowed: Callable[[object, list[int]], list[int] | torch.Tensor],
                 start: Callable[[], object], advance: Callable[[object, int], None],
                 finished: Callable[[object], bool]) -> None:
        self.allowed, self.start, self.advance, self.finished = allowed, start, advance, finished


def bits_to_ids(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Token ids whose bit is set in a 32-bit-word bitmask."""
    import numpy as np

    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(np.flatnonzero(bits))


def llguidance_walker(tokenizer, schema: dict) -> tuple[Walker, float, float]:
    import llguidance
    import llguidance.hf

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    words = (lltok.vocab_size + 31) // 32

    def allowed(matcher, _):
        mask = torch.zeros((1, words), dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        return bits_to_ids(mask[0], len(tokenizer))

    return (Walker(allowed, lambda: llguidance.LLMatcher(lltok, grammar), lambda m, t: m.consume_token(t),
                   lambda m: m.is_stopped()), t1 - t0, t2 - t1)


def xgrammar_walker(tokenizer, schema: dict) -> tuple[Walker, float, float]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    t2 = time.perf_counter()

    def allowed(matcher, _):
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)
        matcher.fill_next_token_bitmask(mask)
        return bits_to_ids(mask[0], len(tokenizer))

    return (Walker(allowed, lambda: xgr.GrammarMatcher(compiled), lambda m, t: m.accept_token(t),
                   lambda m: m.is_terminated()), t1 - t0, t2 - t1)


def outlines_walker(tokenizer, schema: dict) -> tuple[Walker, float, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    special = set(tokenizer.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            key = bytes([int(token[3:5], 16)])
        else:
            key = token.replace("\u2581", " ").encode()
        table.setdefault(key, []).append(index)
    vocabulary = Vocabulary(tokenizer.eos_token_id, table)
    t1 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
    t2 = time.perf_counter()
    return (Walker(lambda g, _: torch.tensor(g.get_tokens()), lambda: Guide(index), lambda g, t: g.advance(t),
                   lambda g: g.is_finished()), t1 - t0, t2 - t1)


def lmfe_walker(tokenizer, schema: dict) -> tuple[Walker, float, float]:
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

    t0 = time.perf_counter()
    data = build_token_enforcer_tokenizer_data(tokenizer)
    t1 = time.perf_counter()
    parser = JsonSchemaParser(schema)
    t2 = time.perf_counter()

    class State:
        def __init__(self) -> None:
            self.enforcer, self.ids = TokenEnforcer(data, parser), []

    def allowed(state, _):
        result = state.enforcer.get_allowed_tokens(state.ids)
        return torch.tensor(list(getattr(result, "allowed_tokens", result)))

    return (Walker(allowed, State, lambda s, t: s.ids.append(t),
                   lambda s: bool(s.ids) and s.ids[-1] == tokenizer.eos_token_id), t1 - t0, t2 - t1)


def walk(walker: Walker, tokenizer, seed: int, max_tokens: int = 200) -> tuple[str, int, float]:
    """One random walk; returns the text, the tokens taken and the seconds spent on masks."""
    generator = torch.Generator().manual_seed(seed)
    state, ids, mask_s = walker.start(), [], 0.0
    for _ in range(max_tokens):
        if walker.finished(state):
            break
        started = time.perf_counter()
        allowed = walker.allowed(state, ids)
        mask_s += time.perf_counter() - started
        if len(allowed) == 0:
            break
        logits = torch.randn(len(allowed), generator=generator)
        token = int(allowed[int(torch.argmax(logits))])
        if token == tokenizer.eos_token_id:
            break
        walker.advance(state, token)
        ids.append(token)
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids), mask_s


def main() -> None:
    """Run every installed candidate and print (and record) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory (fast)")
    parser.add_argument("--walks", type=int, default=50)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = []
    for name, build in (("llguidance", llguidance_walker), ("xgrammar", xgrammar_walker),
                        ("outlines-core", outlines_walker), ("lm-format-enforcer", lmfe_walker)):
        try:
            walker, prepare_s, compile_s = build(tokenizer, SCHEMA)
        except Exception as exc:  # a candidate that cannot run here is reported, not fatal
            rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        valid, tokens, mask_s = 0, 0, 0.0
        for seed in range(args.walks):
            text, count, spent = walk(walker, tokenizer, seed)
            tokens, mask_s = tokens + count, mask_s + spent
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        rows.append(f"| {name} | {prepare_s:.2f} | {compile_s * 1000:.1f} | {mask_s / max(tokens, 1) * 1e6:.0f} | "
                    f"{valid}/{args.walks} |")
    table = "\n".join(["| library | tokenizer prep s | schema compile ms | mask µs/token | valid walks |",
                       "|---|---:|---:|---:|---:|", *rows])
    print(table)
    if not args.no_write:
        cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True,
                             text=True).stdout.strip()
        with (REPO / "benchmarks" / "RESULTS.md").open("a") as handle:
            handle.write(f"\n## grammar_backends — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
                         f"- machine: {cpu}, {os.cpu_count()} cores (shared with other jobs); tokenizer: "
                         f"{args.tokenizer} ({len(tokenizer)} tokens); command: "
                         "`python benchmarks/grammar_backends.py`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
