"""Cleaning canonical records: ``tunelab data clean``.

In order, each record is (optionally) redacted, then checked, and dropped at the first check it
fails:

1. PII redaction (``redact_pii``): e-mail addresses become ``[EMAIL]``, phone numbers ``[PHONE]``;
   a redacted record gets a ``provenance`` whose ``parent`` is the one it had.
2. Empty or garbled text: an empty answer, U+FFFD replacement characters, control characters,
   mojibake (UTF-8 read as Latin-1/cp1252: ``Ã©``, ``â€™``), a text that repeats itself
   (degenerate generation loops), a text that is mostly symbols.
3. Length filters, in words, characters or tokens.
4. Language filter (py3langid), when languages are given.
5. Exact duplicates after normalisation (NFKC, case-folded, whitespace collapsed).
6. Near duplicates: MinHash signatures of character 5-gram shingles, candidates from LSH bands,
   confirmed when the estimated Jaccard similarity is at least the threshold. A record is dropped
   when it is close to a record already kept (the first of a group is kept, nothing is dropped
   for resembling a record that was itself dropped).

The per-record work (1-4 and the signatures) runs as a ``datasets`` map over worker processes
and is cached by fingerprint; the whole result is cached too, so a repeated run only copies it.
What is checked for garbling and dedup is the text that trains: system prompts are left out of
the dedup text (a shared system prompt would make every record look alike), the rejected side
of a preference pair and the completion of an undesirable KTO record are not checked for
garbling (they may be bad on purpose).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunelab.datatools.cached_map import cache_root, columns, directory_fingerprint, fingerprint, map_cached, progress
from tunelab.data.readers import ConversationFormat, Kind, ReadResult, check_read, iter_canonical
from tunelab.datatools.convert import rejects_path_for
from tunelab.data.files import file_fingerprint
from tunelab.datatools.jsonl_output import claim_job_outputs, provenance, write_jsonl
from tunelab.data.records import LoadReport
from tunelab.errors import DataError, TunelabError

CACHE_VERSION = 2  # bump when the checks change what they keep for the same inputs
DedupOn = Literal["all", "prompt", "answer"]
LengthUnit = Literal["words", "chars", "tokens"]

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # international: +44 20 7946 0958
    r"|(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American: (555) 123-4567, 555-123-4567
    r"|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}"  # national trunk prefix: 020 7946 0958, 030-1234-5678
    r")(?![\w])"
)
MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf]|â€[\u0080-\u00bf\u0152-\u0178\u02c6-\u02dc\u2013-\u2122]|Â[\u00a0-\u00bf]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ALNUM_RUNS = re.compile(r"[^\W_]+")  # letters and digits of any script


@dataclass
class CleanOptions:
    """What ``clean`` checks; the defaults are what ``tunelab data clean`` does with no options.

    Attributes:
        exact_dedup: drop records equal to an earlier one after normalisation.
        near_dedup: drop records whose estimated Jaccard similarity to a kept record is at least
            ``near_dup_threshold`` (character ``shingle_size``-grams, ``num_perm`` MinHash values).
        dedup_on: which text is compared: ``all`` (everything but system prompts), ``prompt``
            (user/tool turns) or ``answer`` (assistant turns, chosen and rejected).
        min_length, max_length: bounds on the whole record's length (``length_unit``).
        min_answer_length: lower bound on the answer's length (last assistant turn, chosen side).
        length_unit: ``words``, ``chars`` or ``tokens`` (needs ``tokenizer``).
        tokenizer: a tokenizer or model directory, for ``tokens``.
        garbled_filter: drop empty and garbled texts.
        max_repetition: share of repeated word 3-grams above which a text counts as looping.
        redact_pii: replace e-mail addresses and phone numbers.
        languages: keep only records detected as one of these ISO 639-1 codes (None: no filter).
        seed: seed of the MinHash permutations.
    """

    exact_dedup: bool = True
    near_dedup: bool = True
    near_dup_threshold: float = 0.8
    dedup_on: DedupOn = "all"
    min_length: int | None = None
    max_length: int | None = None
    min_answer_length: int | None = None
    length_unit: LengthUnit = "words"
    tokenizer: str | None = None
    garbled_filter: bool = True
    max_repetition: float = 0.5
    redact_pii: bool = False
    languages: tuple[str, ...] | None = None
    num_perm: int = 128
    shingle_size: int = 5
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`TunelabError` for settings that cannot work, naming the option to fix."""
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise TunelabError(f"--near-dup-threshold {self.near_dup_threshold}: must be in (0, 1]")
        if self.length_unit == "tokens" and not self.tokenizer:
            raise TunelabError("--length-unit tokens needs --tokenizer DIR (a tokenizer or model directory)")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise TunelabError(f"--min-length {self.min_length} is above --max-length {self.max_length}")
        if not 0.0 < self.max_repetition <= 1.0:
            raise TunelabError(f"--max-repetition {self.max_repetition}: must be in (0, 1]")
        if self.num_perm < 16 or self.shingle_size < 1:
            raise TunelabError("num_perm must be at least 16 and shingle_size at least 1")
        if self.languages:
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError:
                raise TunelabError("--lang needs the py3langid package: pip install 'tunelab[data]'") from None
            known = set(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
            unknown = sorted(set(self.languages) - known)
            if unknown:
                raise TunelabError(f"--lang {','.join(unknown)}: not a language code the identifier knows; "
                                   f"use ISO 639-1 codes such as {', '.join(sorted(known)[:12])}, ...")

    def feature_settings(self) -> dict[str, Any]:
        """The settings that decide the per-record features (part of the map cache key)."""
        settings = asdict(self)
        for name in ("exact_dedup", "near_dedup", "near_dup_threshold"):
            settings.pop(name)
        if self.tokenizer:
            settings["tokenizer"] = directory_fingerprint(self.tokenizer, "--tokenizer")
        return settings


# --- the text of a record ------------------------------------------------------------------------



LANGUAGE_MIN_CONFIDENCE = 0.5
"""The language filter drops a record only when py3langid's normalised probability of another language reaches this."""


@functools.cache
def _language_identifier():
    """py3langid's identifier with normalised probabilities (0-1 confidences), loaded once per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _contents(messages: list[dict[str, str]], roles: set[str]) -> list[str]:
    return [m["content"] for m in messages if m["role"] in roles]


def _feedback_split(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end], messages[end:]


def record_parts(record: dict[str, Any]) -> dict[str, list[str]]:
    """The texts of a canonical record by part: ``system``, ``prompt``, ``answer``, ``other``.

    ``answer`` is what trains as the good answer (assistant turns, the chosen side, a desirable
    KTO completion, a prompt's reference); ``other`` is the rejected side or an undesirable
    completion; a text record is all ``answer``.
    """
    parts: dict[str, list[str]] = {"system": [], "prompt": [], "answer": [], "other": []}
    prompt_roles = {"user", "tool"}
    if "text" in record and "messages" not in record:
        parts["answer"] = [record["text"]]
    elif "chosen" in record:
        parts["system"] = _contents(record["prompt"], {"system"})
        parts["prompt"] = _contents(record["prompt"], prompt_roles | {"assistant"})
        parts["answer"] = _contents(record["chosen"], {"assistant", "tool", "user"})
        parts["other"] = _contents(record["rejected"], {"assistant", "tool", "user"})
    elif "label" in record:
        prompt, completion = _feedback_split(record["messages"])
        parts["system"] = _contents(prompt, {"system"})
        parts["prompt"] = _contents(prompt, prompt_roles | {"assistant"})
        parts["answer" if record["label"] else "other"] = _contents(completion, {"assistant"})
    else:
        messages = record["messages"]
        parts["system"] = _contents(messages, {"system"})
        parts["prompt"] = _contents(messages, prompt_roles)
        parts["answer"] = _contents(messages, {"assistant"})
        if record.get("reference"):
            parts["answer"].append(record["reference"])
    return parts


def dedup_text(parts: dict[str, list[str]], dedup_on: DedupOn) -> str:
    """The text compared for duplicates (system prompts never count)."""
    if dedup_on == "prompt":
        return "\n".join(parts["prompt"])
    if dedup_on == "answer":
        return "\n".join(parts["answer"] + parts["other"])
    return "\n".join(parts["prompt"] + parts["answer"] + parts["other"])


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the form compared for exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# --- checks -----------------------------------------------------------------------------------------


def redact_pii(text: str) -> tuple[str, int, int]:
    """Replace e-mail addresses with ``[EMAIL]`` and phone numbers with ``[PHONE]``.

    A phone number needs 7 to 15 digits in one of the shapes matched by ``PHONE`` (international
    ``+CC ...``, North American ``(555) 123-4567``, national ``020 7946 0958``), so dates,
    years, prices and arithmetic are left alone.

    Returns:
        The redacted text, the number of e-mails and the number of phone numbers replaced.
    """
    text, emails = EMAIL.subn("[EMAIL]", text)
    phones = 0

    def replace_phone(match: re.Match) -> str:
        nonlocal phones
        if not 7 <= sum(c.isdigit() for c in match.group()) <= 15:
            return match.group()
        phones += 1
        return "[PHONE]"

    text = PHONE.sub(replace_phone, text)
    return text, emails, phones


def _redact_record(record: dict[str, Any]) -> tuple[int, int]:
    """Redact every message content, text and reference of a record in place; returns (e-mails, phones)."""
    emails = phones = 0

    def fix(value: str) -> str:
        nonlocal emails, phones
        value, found_emails, found_phones = redact_pii(value)
        emails += found_emails
        phones += found_phones
        return value

    for key in ("messages", "prompt", "chosen", "rejected"):
        for message in record.get(key) or []:
            message["content"] = fix(message["content"])
    for key in ("text", "reference"):
        if isinstance(record.get(key), str):
            record[key] = fix(record[key])
    return emails, phones


def garbled_reason(text: str, max_repetition: float = 0.5) -> str | None:
    """Why a text looks garbled, or None. See the module docstring for the checks."""
    if "\ufffd" in text:
        return "garbled: contains U+FFFD replacement characters (decoded with the wrong encoding)"
    if _CONTROL.search(text):
        return "garbled: contains control characters"
    if len(MOJIBAKE.findall(text)) >= 2:
        return "garbled: mojibake (UTF-8 text decoded as Latin-1/cp1252, e.g. 'Ã©' for 'é')"
    words = text.split()
    if len(words) >= 20:
        trigrams = list(zip(words, words[1:], words[2:]))
        if 1 - len(set(trigrams)) / len(trigrams) > max_repetition:
            return f"garbled: repeats itself (over {max_repetition:.0%} of word 3-grams are repeats)"
    visible = len("".join(words))
    if visible >= 20 and sum(map(len, _ALNUM_RUNS.findall(text))) / visible < 0.3:
        return "garbled: mostly symbols (under 30% letters or digits)"
    return None


# --- MinHash and LSH -----------------------------------------------------------------------------------

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-add-shift hash functions (a odd): h(x) = (a*x + b) mod 2^64 >> 32 for 32-bit x."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, size: int = 5) -> np.ndarray:
    """32-bit hashes of the character ``size``-grams of ``text`` (the whole text if shorter).

    Repeated shingles are not removed: a minimum does not change when a value repeats.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.uint64)
    size = min(size, len(codes))
    count = len(codes) - size + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(size):  # polynomial hash of each window; uint64 arithmetic wraps
        hashes = hashes * _BASE + codes[offset : offset + count]
    hashes ^= hashes >> np.uint64(31)  # splitmix64 finaliser: spread every input bit
    hashes *= _MIX1
    hashes ^= hashes >> np.uint64(27)
    hashes *= _MIX2
    hashes ^= hashes >> np.uint64(31)
    return hashes >> np.uint64(32)


def minhash_signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (uint32, one value per permutation) of a set of shingle hashes."""
    signature = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(hashes), 2048):  # bounded memory for long documents
        values = a[:, None] * hashes[None, start : start + 2048]
        values += b[:, None]
        np.minimum(signature, values.min(axis=1), out=signature)
    return (signature >> np.uint64(32)).astype(np.uint32)  # the top bits: the min commutes with the shift


def lsh_bands(threshold: float, num_perm: int, recall_at_threshold: float = 0.98) -> tuple[int, int]:
    """LSH bands and rows per band: the most rows (fewest chance candidates) that still make a pair
    at exactly ``threshold`` similarity a candidate with probability ``recall_at_threshold``."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall_at_threshold:
            return bands, rows
    return num_perm, 1


class NearDuplicateIndex:
    """LSH over MinHash signatures of the records kept so far."""

    def __init__(self, num_perm: int, threshold: float) -> None:
        self.threshold = threshold
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: dict[int, np.ndarray] = {}

    def _keys(self, signature: np.ndarray) -> list[bytes]:
        raw = signature.tobytes()
        width = self.rows * signature.itemsize
        return [raw[band * width : (band + 1) * width] for band in range(self.bands)]

    def match(self, signature: np.ndarray) -> tuple[int, float] | None:
        """The first kept record whose estimated Jaccard similarity is at least the threshold, and it."""
        seen: set[int] = set()
        best: tuple[int, float] | None = None
        for table, key in zip(self.tables, self._keys(signature)):
            for candidate in table.get(key, ()):
                if candidate in seen:
                    continue
                seen.add(candidate)
                similarity = float(np.mean(self.signatures[candidate] == signature))
                if similarity >= self.threshold and (best is None or candidate < best[0]):
                    best = (candidate, similarity)
        return best

    def add(self, item: int, signature: np.ndarray) -> None:
        """Index a kept record."""
        self.signatures[item] = signature
        for table, key in zip(self.tables, self._keys(signature)):
            table.setdefault(key, []).append(item)


# --- per-record features (runs in datasets.map workers) --------------------------------------------------


class _Features:
    """The picklable map function: redaction, checks, exact key and MinHash signature per record."""

    def __init__(self, options: CleanOptions) -> None:
        self.options = options
        self.a, self.b = _permutations(options.num_perm, options.seed)
        self._tokenizer = None

    def _length(self, text: str) -> int:
        unit = self.options.length_unit
        if unit == "chars":
            return len(text)
        if unit == "words":
            return len(text.split())
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.options.tokenizer)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _reason(self, parts: dict[str, list[str]]) -> str | None:
        options = self.options
        answer = "\n".join(parts["answer"])
        if options.garbled_filter:
            if parts["answer"] and not answer.strip():
                return "empty answer"
            for text in (*parts["system"], *parts["prompt"], *parts["answer"]):
                reason = garbled_reason(text, options.max_repetition)
                if reason:
                    return reason
        unit = options.length_unit
        if options.min_length is not None or options.max_length is not None:
            longest_side = max(("\n".join(parts["answer"]), "\n".join(parts["other"])), key=len)
            length = self._length("\n".join(parts["system"] + parts["prompt"] + [longest_side]))
            if options.min_length is not None and length < options.min_length:
                return f"shorter than --min-length {options.min_length} {unit}"
            if options.max_length is not None and length > options.max_length:
                return f"longer than --max-length {options.max_length} {unit}"
        if options.min_answer_length is not None and self._length(answer) < options.min_answer_length:
            return f"answer shorter than --min-answer-length {options.min_answer_length} {unit}"
        if options.languages:
            sample = "\n".join(parts["prompt"] + parts["answer"])[:2000]
            language, confidence = _language_identifier().classify(sample)
            # Short texts ("Sum 3 + 4", "Explain recursion") get a low-confidence guess (Latin,
            # French); only a confident identification of another language drops a record.
            if language not in options.languages and confidence >= LANGUAGE_MIN_CONFIDENCE:
                return f"language is {language}, not {'/'.join(options.languages)}"
        return None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"record": [], "emails": [], "phones": [], "reason": [], "exact_key": [],
                                "signature": []}
        for raw in batch["record"]:
            record = json.loads(raw)
            emails = phones = 0
            if self.options.redact_pii:
                emails, phones = _redact_record(record)
            parts = record_parts(record)
            reason = self._reason(parts)
            key, signature = "", b""
            if reason is None:
                text = normalize(dedup_text(parts, self.options.dedup_on))
                key = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
                signature = minhash_signature(shingle_hashes(text, self.options.shingle_size), self.a, self.b).tobytes()
            out["record"].append(json.dumps(record, ensure_ascii=False) if emails or phones else "")
            out["emails"].append(emails)
            out["phones"].append(phones)
            out["reason"].append(reason or "")
            out["exact_key"].append(key)
            out["signature"].append(signature)
        return out


# --- the whole job -----------------------------------------------------------------------------------------


@dataclass
class CleanReport:
    """What ``clean`` read, kept and removed (by reason, with the first place), and what it redacted."""

    read: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    removed_first_at: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)
    unreadable_first_at: dict[str, str] = field(default_factory=dict)
    emails_redacted: int = 0
    phones_redacted: int = 0
    redacted_records: int = 0
    lsh: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False
    rejects_path: Path | None = None  # where the removed and unreadable records went (None: nothing removed)

    def remove(self, reason: str, source: str) -> None:
        """Count a removed record under its reason."""
        self.removed[reason] = self.removed.get(reason, 0) + 1
        self.removed_first_at.setdefault(reason, source)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"{self.kept:,} of {self.read:,} records kept" + (" (from cache)" if self.from_cache else "")]
        out += [f"{count:,} removed: {reason} (first at {self.removed_first_at[reason]})"
                for reason, count in sorted(self.removed.items(), key=lambda item: -item[1])]
        out += [f"{count:,} unreadable: {reason} (first at {self.unreadable_first_at[reason]})"
                for reason, count in sorted(self.unreadable.items(), key=lambda item: -item[1])]
        if self.redacted_records:
            out.append(f"redacted {self.emails_redacted:,} e-mail addresses and {self.phones_redacted:,} phone numbers "
                       f"in {self.redacted_records:,} records")
        return out


@dataclass
class CleanResult:
    """Kept records (canonical objects, in input order), removed ones with reasons, and the report."""

    kept: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    report: CleanReport


NEAR_DUPLICATE = "near duplicate (Jaccard similarity >= {threshold}) of a kept record"
EXACT_DUPLICATE = "exact duplicate (after normalising case and whitespace) of a kept record"


def clean_records(
    records: list[dict[str, Any]],
    sources: list[str],
    options: CleanOptions | None = None,
    *,
    cache_key: str | None = None,
    num_proc: int | None = None,
) -> CleanResult:
    """Clean canonical records (see the module docstring).

    Args:
        records: canonical record objects (as written by ``tunelab data``).
        sources: the ``file:line`` of each record (for reports and provenance).
        options: the checks to run.
        cache_key: identifies ``records`` (e.g. their files' hashes); with it the per-record
            features are cached on disk. Without it nothing is cached.
        num_proc: worker processes for the per-record features.

    Returns:
        Kept records, removed ones (``{"source", "reason", "duplicate_of", "similarity", "record"}``)
        and the report.
    """
    options = options or CleanOptions()
    options.check()
    report = CleanReport(read=len(records))
    features = map_cached(
        [{"record": json.dumps(r, ensure_ascii=False)} for r in records], _Features(options),
        key=fingerprint("clean-features", CACHE_VERSION, cache_key, options.feature_settings()),
        desc="Checking records", num_proc=num_proc, use_cache=cache_key is not None,
    )
    reasons, keys, redacted_json, emails, phones, signatures = columns(
        features, "reason", "exact_key", "record", "emails", "phones", "signature")
    index = NearDuplicateIndex(options.num_perm, options.near_dup_threshold) if options.near_dedup else None
    report.lsh = {"bands": index.bands, "rows": index.rows} if index else {}
    first_with_key: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for i in progress(range(len(records)), len(records), "Removing duplicates"):
        record = records[i]
        if redacted_json[i]:
            record = json.loads(redacted_json[i])
            parent = record.get("provenance")
            record["provenance"] = provenance("clean/redact-pii", sources[i], emails=emails[i], phones=phones[i],
                                              **({"parent": parent} if parent is not None else {}))
            report.redacted_records += 1
            report.emails_redacted += emails[i]
            report.phones_redacted += phones[i]
        reason, duplicate_of, similarity = reasons[i] or None, None, None
        if reason is None and options.exact_dedup:
            if keys[i] in first_with_key:
                reason, duplicate_of, similarity = EXACT_DUPLICATE, first_with_key[keys[i]], 1.0
        if reason is None and index is not None:
            signature = np.frombuffer(signatures[i], dtype=np.uint32)
            found = index.match(signature)
            if found is not None:
                duplicate_of, similarity = found
                reason = NEAR_DUPLICATE.format(threshold=options.near_dup_threshold)
            else:
                index.add(i, signature)
        if reason is None:
            first_with_key.setdefault(keys[i], i)
            kept.append(record)
            continue
        report.remove(reason, sources[i])
        removed.append({"source": sources[i], "reason": reason,
                        "duplicate_of": sources[duplicate_of] if duplicate_of is not None else None,
                        "similarity": round(similarity, 4) if similarity is not None else None, "record": record})
    report.kept = len(kept)
    return CleanResult(kept, removed, report)


def clean_files(
    files: list[str],
    out: str | Path,
    options: CleanOptions | None = None,
    *,
    kind: Literal["auto"] | Kind = "auto",
    fmt: ConversationFormat = "auto",
    text_field: str = "text",
    rejects_path: str | Path | None = None,
    use_cache: bool = True,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> CleanReport:
    """Clean data files into canonical JSONL at ``out``; removed and unreadable records go to the rejects file.

    The options are checked first, then a missing input is named and ``out`` and the rejects
    file (default ``<out stem>.rejects.jsonl``) are claimed (existing ones refused unless
    ``overwrite``, an input always), then the work starts. With ``use_cache``, a run with the
    same input files (by content) and options copies the stored result instead of recomputing
    it; a run that changes only the dedup settings reuses the stored per-record features.

    Raises:
        DataError: a missing or unreadable file, no usable records, or inputs of different kinds.
        TunelabError: invalid options.
        OutputError: an output exists (without ``overwrite``) or is an input.
    """
    options = options or CleanOptions()
    options.check()
    files = list(files)
    rejects_file = rejects_path_for(out, rejects_path)
    claim_job_outputs(files, [out, rejects_file], overwrite)
    inputs_key = fingerprint([file_fingerprint(f) for f in files], kind, fmt, text_field)
    result_key = fingerprint(CACHE_VERSION, inputs_key, asdict(options), options.feature_settings())
    result_dir = cache_root() / f"clean-{result_key}"
    if use_cache and (result_dir / "report.json").is_file():
        report = CleanReport(**{**json.loads((result_dir / "report.json").read_text()), "from_cache": True})
        _copy_result(result_dir, Path(out), rejects_file)
    else:
        report = _clean_uncached(files, out, options, kind, fmt, text_field, rejects_file, use_cache, num_proc,
                                 inputs_key, result_dir)
    if report.kept == 0:
        raise DataError(f"{', '.join(files)}: every record was removed (see {rejects_file}):\n"
                        + "\n".join(report.lines()))
    report.rejects_path = rejects_file if report.kept < report.read else None
    return report


def _clean_uncached(files: list[str], out: str | Path, options: CleanOptions, kind: Literal["auto"] | Kind,
                    fmt: ConversationFormat, text_field: str, rejects_file: Path, use_cache: bool,
                    num_proc: int | None, inputs_key: str, result_dir: Path) -> CleanReport:
    read = ReadResult([], LoadReport())
    read.records = list(iter_canonical(files, kind, fmt, text_field, None, "skip", read.report, read.rejects,
                                       read.kinds))
    check_read(files, read)
    result = clean_records([r.data for r in read.records], [r.source for r in read.records], options,
                           cache_key=inputs_key if use_cache else None, num_proc=num_proc)
    report = result.report
    report.read = read.report.read
    report.unreadable = dict(read.report.skipped)
    report.unreadable_first_at = dict(read.report.examples)
    rejects = result.removed + [{**reject, "reason": f"unreadable: {reject['reason']}"} for reject in read.rejects]
    target = result_dir if use_cache else Path(out).parent / f".clean-{Path(out).name}.tmp"
    shutil.rmtree(target, ignore_errors=True)
    write_jsonl(target / "output.jsonl", result.kept)
    write_jsonl(target / "rejects.jsonl", rejects)
    (target / "report.json").write_text(json.dumps({k: v for k, v in asdict(report).items()
                                                    if k not in ("from_cache", "rejects_path")}))
    _copy_result(target, Path(out), rejects_file)
    if not use_cache:
        shutil.rmtree(target, ignore_errors=True)
    return report


def _copy_result(stored: Path, out: Path, rejects_file: Path) -> None:
    """Copy a stored result to the user's paths (each replaced atomically)."""
    _copy_atomic(stored / "output.jsonl", out)
    if (stored / "rejects.jsonl").stat().st_size:
        _copy_atomic(stored / "rejects.jsonl", rejects_file)
    elif rejects_file.exists():
        rejects_file.unlink()  # a stale list from an earlier run would mislead


def _copy_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
