"""``tunelab data augment`` and ``tunelab data synth``: the generation-backed data tools (part of :mod:`.data`).

Both take ``--backend hf:MODEL_DIR`` (a local model, batched) or ``--backend openai:BASE_URL``
with ``--backend-model NAME`` (any OpenAI-compatible server; the API key comes from the
environment variable ``--api-key-env`` names). Each command builds its options and a
:class:`~tunelab.datatools.generation_jobs.BackendSpec` and calls one stage function, which checks
the options, claims the outputs, then loads the backend. Neither takes ``--config``: no training
config describes their inputs. Kept light at import: the backends and torch are imported when a
command runs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from tunelab.errors import ConfigError

_OPENAI_OPTIONS = {"api_key_env": "--api-key-env", "concurrency": "--concurrency", "timeout": "--timeout",
                   "max_retries": "--max-retries"}
_HF_OPTIONS = {"device": "--device", "batch_size": "--batch-size"}
_QA_OPTIONS = {"pairs_per_document": "--pairs-per-document", "text_field": "--text-field", "context": "--context",
               "min_grounding": "--min-grounding", "max_document_chars": "--max-document-chars",
               "min_document_chars": "--min-document-chars"}
_SELF_INSTRUCT_OPTIONS = {"num_instructions": "--num-instructions", "prompt_instructions": "--prompt-instructions",
                          "prompt_machine": "--prompt-machine", "new_per_request": "--new-per-request",
                          "requests_per_round": "--requests-per-round", "max_rounds": "--max-rounds",
                          "rouge_threshold": "--rouge-threshold", "min_words": "--min-words",
                          "max_words": "--max-words", "blacklist": "--blacklist"}


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation backend")
    group.add_argument("--backend", required=True,
                       help="hf:MODEL_DIR (local model) or openai:BASE_URL (OpenAI-compatible server)")
    group.add_argument("--backend-model", help="model name on the openai: server")
    group.add_argument("--api-key-env",
                       help="environment variable holding the API key (openai:; default OPENAI_API_KEY)")
    group.add_argument("--concurrency", type=int, help="requests in flight at once (openai:; default 8)")
    group.add_argument("--timeout", type=float, help="seconds to wait for the server (openai:; default 60)")
    group.add_argument("--max-retries", type=int,
                       help="retries of timeouts, connection errors, 429/5xx (openai:; default 3)")
    group.add_argument("--device", help="auto, cpu or cuda[:N] (hf:; default auto)")
    group.add_argument("--batch-size", type=int, help="prompts per generate call (hf:; default 8)")
    group.add_argument("--max-tokens", type=int, help="longest reply in tokens")
    group.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    group.add_argument("--attempts", type=int, default=3,
                       help="replies asked for per request when they are unusable (default 3)")
    group.add_argument("--cache", help="reply cache file (default: one per backend under $TUNELAB_CACHE/generations)")
    group.add_argument("--no-cache", action="store_true", help="keep no reply cache (a re-run asks again)")


def add_generation_commands(data_commands: Any) -> None:
    """Add ``augment`` and ``synth`` to the ``tunelab data`` subcommands (:func:`tunelab.cli.data.register`)."""
    augment = data_commands.add_parser(
        "augment", help="new records from existing ones: paraphrase, back-translation, restyling, constraints",
        description="Augment conversations, prompts or text with a generation backend; every new record links "
                    "to its source (provenance: file:line and parent id).",
    )
    augment.add_argument("inputs", nargs="+", metavar="INPUT", help="data files (any supported format)")
    augment.add_argument("--out", required=True, help="output JSONL (report and failures are written beside it)")
    augment.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    augment.add_argument("--ops", type=_comma_list, default=("paraphrase",),
                         help="comma list of paraphrase, backtranslate, restyle, constrain (default paraphrase)")
    augment.add_argument("--variants", type=int, default=1, help="new records per source record and operation")
    augment.add_argument("--pivot", default="German", help="pivot language of back-translation (default German)")
    augment.add_argument("--source-language", default="English", help="language of the data (default English)")
    augment.add_argument("--styles", type=_comma_list, help="restyle styles (default formal,casual,detailed,concise)")
    augment.add_argument("--constraints", type=_comma_list,
                         help="built-in constraints to draw from (default all: one-sentence, max-50-words, "
                              "bullet-points, lowercase, no-commas, json); 'none' for only --constraint ones")
    augment.add_argument("--constraint", action="append", default=[], metavar="TEXT",
                         help="your own constraint sentence (repeatable; not checked)")
    augment.add_argument("--answers", choices=["keep", "regenerate"], default="keep",
                         help="keep the source's answer for rewritten instructions, or generate a new one")
    augment.add_argument("--prompts", help="YAML file replacing the paraphrase/translate/restyle prompts")
    augment.add_argument("--kind", choices=["auto", "conversation", "prompt", "text"], default="auto",
                         help="read the inputs as this kind of record (default: detect)")
    augment.add_argument("--text-field", default="text", help="field holding text for text records")
    augment.add_argument("--include-sources", action="store_true", help="also write the source records")
    augment.add_argument("--limit", type=int, help="augment only the first N records (try a job on a few first)")
    _add_backend_options(augment)
    augment.set_defaults(func=_cmd_augment)

    synth = data_commands.add_parser(
        "synth", help="synthetic data: QA pairs from documents, or self-instruct from seed tasks",
        description="--method qa: question-answer pairs from context documents. --method self-instruct: new "
                    "instructions from seed tasks through the self-instruct filters (ROUGE-L < 0.7 against "
                    "every kept instruction, length, keywords, dedup), then an instance for each.",
    )
    synth.add_argument("inputs", nargs="+", metavar="INPUT", help="documents (qa) or seed tasks (self-instruct)")
    synth.add_argument("--out", required=True, help="output JSONL (report, rejects and failures beside it)")
    synth.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    synth.add_argument("--method", required=True, choices=["qa", "self-instruct"])
    synth.add_argument("--limit", type=int, help="use only the first N documents or seed tasks")
    qa = synth.add_argument_group("qa")
    qa.add_argument("--pairs-per-document", type=int, help="questions asked for per document (default 3)")
    qa.add_argument("--text-field", help="field holding the document (default text; dialogue for DialogSum)")
    qa.add_argument("--context", choices=["include", "omit"], help="put the document in each record (default include)")
    qa.add_argument("--min-grounding", type=float,
                    help="least share of an answer's content words found in the document (default 0.5)")
    qa.add_argument("--max-document-chars", type=int, help="cut longer documents (default 6000)")
    qa.add_argument("--min-document-chars", type=int, help="skip shorter documents (default 50)")
    si = synth.add_argument_group("self-instruct")
    si.add_argument("--num-instructions", type=int, help="new instructions to keep (default 100)")
    si.add_argument("--prompt-instructions", type=int, help="example instructions per prompt (default 8)")
    si.add_argument("--prompt-machine", type=int, help="of which generated ones (default 2)")
    si.add_argument("--new-per-request", type=int, help="new tasks asked for per prompt (default 8)")
    si.add_argument("--requests-per-round", type=int, help="prompts per round (default 8)")
    si.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: until the target)")
    si.add_argument("--rouge-threshold", type=float, help="reject at ROUGE-L >= this vs any kept one (default 0.7)")
    si.add_argument("--min-words", type=int, help="keep instructions with more words than this (default 3)")
    si.add_argument("--max-words", type=int, help="keep instructions with at most this many words (default 150)")
    si.add_argument("--blacklist", type=_comma_list, help="comma list of rejected keywords ('' for none)")
    _add_backend_options(synth)
    synth.set_defaults(func=_cmd_synth)


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, key) for key in names if getattr(args, key) is not None}


def _refuse(args: argparse.Namespace, names: dict[str, str], why: str) -> None:
    given = [flag for key, flag in names.items() if getattr(args, key) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: {why}")


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend's options, refusing those that do not apply to its kind (nothing loads)."""
    kind = args.backend.partition(":")[0]
    if kind == "hf":
        _refuse(args, _OPENAI_OPTIONS, "only for openai: backends")
        options = _given(args, _HF_OPTIONS)
        if args.max_tokens is not None:
            options["max_new_tokens"] = args.max_tokens
    else:
        _refuse(args, _HF_OPTIONS, "only for hf: backends")
        options = _given(args, _OPENAI_OPTIONS)
    return options


def _backend(args: argparse.Namespace):
    """The backend the options name, loaded by the job once its outputs are claimed (nothing loads here)."""
    from tunelab.datatools.generation_jobs import BackendSpec

    return BackendSpec(args.backend, args.backend_model, _backend_options(args))


def _sampling(args: argparse.Namespace, default):
    """The default sampling with what the options override."""
    changes = {"seed": args.seed}
    for key in ("temperature", "top_p", "max_tokens"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    return replace(default, **changes)


def _cache(args: argparse.Namespace):
    if args.no_cache and args.cache:
        raise ConfigError("--cache and --no-cache: choose one")
    return False if args.no_cache else args.cache


def _finish(result) -> int:
    print(result.summary())
    if result.written == 0:
        print(f"error: no records were generated (see {result.report_path})", file=sys.stderr)
        return 1
    return 0


def _cmd_augment(args: argparse.Namespace) -> int:
    from tunelab.datatools.augment import CONSTRAINTS, STYLES, AugmentOptions, augment_files

    constraints = tuple(CONSTRAINTS) if args.constraints is None else args.constraints
    if constraints == ("none",):
        constraints = ()
    options = AugmentOptions(
        operations=args.ops, variants=args.variants, pivot=args.pivot, source_language=args.source_language,
        styles=args.styles or tuple(STYLES), constraints=constraints, custom_constraints=tuple(args.constraint),
        answers=args.answers, prompts_file=args.prompts, kind=args.kind, text_field=args.text_field,
        include_sources=args.include_sources, limit=args.limit,
    )
    options.sampling = _sampling(args, options.sampling)
    result = augment_files(args.inputs, args.out, _backend(args), options, _cache(args), args.attempts,
                           overwrite=args.overwrite)
    return _finish(result)


def _cmd_synth(args: argparse.Namespace) -> int:
    from tunelab.datatools.synth import QAOptions, SelfInstructOptions, self_instruct, synth_qa

    if args.method == "qa":
        _refuse(args, _SELF_INSTRUCT_OPTIONS, "only for --method self-instruct")
        options: Any = QAOptions(**_given(args, _QA_OPTIONS), limit=args.limit)
        options.sampling = _sampling(args, options.sampling)
        run = synth_qa
    else:
        _refuse(args, _QA_OPTIONS, "only for --method qa")
        options = SelfInstructOptions(**_given(args, _SELF_INSTRUCT_OPTIONS), limit=args.limit)
        options.sampling = _sampling(args, options.sampling)
        # Instances stay greedy (as in the paper); only their length follows --max-tokens.
        options.instance_sampling = replace(options.instance_sampling, seed=args.seed,
                                            max_tokens=args.max_tokens or options.instance_sampling.max_tokens)
        run = self_instruct
    return _finish(run(args.inputs, args.out, _backend(args), options, _cache(args), args.attempts,
                       overwrite=args.overwrite))
