"""Distribution drift of served traffic against a reference: KS test and PSI per feature.

Features are per-request numbers: ``input_length`` (prompt tokens), ``output_length``
(completion tokens), ``perplexity`` (exp of minus the mean output log-prob) and ``latency``
(seconds). A feature drifts when the two-sample Kolmogorov–Smirnov test rejects equality
(``p < alpha``) *and* the population stability index shows a material shift (``PSI >=
psi_threshold``): the KS test alone flags tiny, harmless shifts once windows hold thousands of
requests. Against a constant reference (every prompt the same length, say) PSI alone decides. With an embedding model, the distance between the prompt-embedding centroids of the
two samples is tested too, by a seeded permutation test.

References (:func:`load_reference`): an earlier window of the same store (``window:7d``), another
store (``.db``), a JSONL file of request records (``tunelab serve --request-log``), a data file
(an eval set or the training data, tokenized as the server would), or a tunelab run (its data).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from tunelab.monitor.durations import parse_duration
from tunelab.monitor.store import MonitorError, Requests, read_meta, read_requests

FEATURES = ("input_length", "output_length", "perplexity", "latency")


@dataclass
class Sample:
    """Values of each feature (finite values only) and, when known, the prompt texts."""

    label: str
    values: dict[str, np.ndarray]
    texts: list[str] | None = None

    def size(self) -> int:
        """Number of requests or records (the largest feature column)."""
        return max((len(v) for v in self.values.values()), default=0)


@dataclass
class FeatureDrift:
    """The comparison of one feature."""

    feature: str
    n_reference: int
    n_recent: int
    reference_median: float | None = None
    recent_median: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    psi: float | None = None
    drift: bool = False
    note: str | None = None  # why a feature was not tested


@dataclass
class EmbeddingDrift:
    """Cosine distance between prompt-embedding centroids and its permutation p-value."""

    n_reference: int
    n_recent: int
    distance: float
    pvalue: float
    drift: bool


@dataclass
class DriftReport:
    """All comparisons of one check."""

    reference: str
    recent: str
    features: list[FeatureDrift]
    embedding: EmbeddingDrift | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        """True when any feature (or the embedding centroid) drifted."""
        return any(f.drift for f in self.features) or bool(self.embedding and self.embedding.drift)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {"drift": self.drift, **asdict(self)}


def sample_from_requests(requests: Requests, label: str, successful_only: bool = True) -> Sample:
    """Feature values of stored requests (by default only those answered with status 200)."""
    rows = requests.select(requests.succeeded) if successful_only else requests
    values = {
        "input_length": rows.prompt_tokens.astype(np.float64),
        "output_length": rows.completion_tokens.astype(np.float64),
        "perplexity": rows.perplexity,
        "latency": rows.latency_s,
    }
    texts = [p for p in rows.prompt if p is not None]
    return Sample(label, {k: v[np.isfinite(v)] for k, v in values.items()}, texts or None)


def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``recent`` against ``reference``.

    Bins are the reference's deciles. A reference with ``bins`` distinct values or fewer (a
    constant, a few token counts) gets one bin per value and one per gap between, below and
    above them instead: with deciles, every value of a constant reference and every larger
    recent value share one bin, and an upward shift scores 0. Counts get half a count of
    smoothing so that an empty bin gives a large but finite value.
    """
    values = np.unique(reference)
    if len(values) <= bins:
        def bin_of(x: np.ndarray) -> np.ndarray:  # 2i: below values[i] (after values[i-1]); 2i+1: equal to it
            index = np.searchsorted(values, x, side="left")
            exact = values[np.minimum(index, len(values) - 1)] == x
            return 2 * index + (exact & (index < len(values)))
        ref_bins, new_bins, count = bin_of(reference), bin_of(recent), 2 * len(values) + 1
    else:
        edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1))[1:-1])
        ref_bins, new_bins = np.searchsorted(edges, reference, side="right"), np.searchsorted(edges, recent, side="right")
        count = len(edges) + 1
    ref_counts = np.bincount(ref_bins, minlength=count) + 0.5
    new_counts = np.bincount(new_bins, minlength=count) + 0.5
    expected, actual = ref_counts / ref_counts.sum(), new_counts / new_counts.sum()
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def compare_samples(reference: Sample, recent: Sample, alpha: float = 0.01, psi_threshold: float = 0.1,
                    min_samples: int = 30, features: tuple[str, ...] = FEATURES) -> list[FeatureDrift]:
    """KS test and PSI of every feature present in both samples.

    Args:
        reference: the baseline.
        recent: the traffic to check.
        alpha: KS significance level.
        psi_threshold: smallest PSI that counts as a material shift (0: the KS test alone decides).
        min_samples: features with fewer values on either side are reported, not tested.
        features: which features to compare.
    """
    results = []
    for name in features:
        ref, new = reference.values.get(name), recent.values.get(name)
        if ref is None or new is None:
            where = reference.label if ref is None else recent.label
            results.append(FeatureDrift(name, 0 if ref is None else len(ref), 0 if new is None else len(new),
                                        note=f"not available in {where}"))
            continue
        result = FeatureDrift(name, len(ref), len(new))
        if len(ref) < min_samples or len(new) < min_samples:
            result.note = f"too few values (need {min_samples} on each side)"
            results.append(result)
            continue
        test = ks_2samp(ref, new)
        result.reference_median, result.recent_median = float(np.median(ref)), float(np.median(new))
        result.ks_statistic, result.ks_pvalue = float(test.statistic), float(test.pvalue)
        result.psi = psi(ref, new)
        if np.ptp(ref) == 0:  # one reference value: the KS test's p-value assumes continuous data; PSI decides
            result.drift = result.psi >= psi_threshold
        else:
            result.drift = result.ks_pvalue < alpha and result.psi >= psi_threshold
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# References


def load_reference(reference: str, db: str | Path, recent_start: float, window_s: float,
                   tokenizer_dir: str | None = None, model: str | None = None) -> Sample:
    """The reference sample named by ``reference``.

    Args:
        reference: ``window:DURATION`` (the DURATION before the recent window, same store), a
            store (``.db``/``.sqlite``), a JSONL of request records, a data file, or a run id or
            run directory (its eval data, else its training data).
        db: the store being checked (for ``window:`` and for the served model's tokenizer).
        recent_start: unix time where the recent window starts.
        window_s: length of the recent window in seconds.
        tokenizer_dir: tokenizer for data files (default: the model the store's server served).
        model: only this model/adapter name, for store references.

    Raises:
        MonitorError: the reference cannot be found or read.
    """
    if reference.startswith("window:"):
        length = parse_duration(reference.removeprefix("window:"), "--reference window:")
        requests = read_requests(db, since=recent_start - length, until=recent_start, model=model)
        return sample_from_requests(requests, f"the {reference.removeprefix('window:')} before the window")
    path = Path(reference).expanduser()
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return sample_from_requests(read_requests(path, model=model, with_text=True), str(path))
    if path.is_file() and _is_request_log(path):
        return _sample_from_request_log(path, model)
    if path.is_file():
        return sample_from_data([str(path)], _tokenizer_for(db, tokenizer_dir, reference), str(path))
    run_files, run_tokenizer = _run_reference(reference)
    return sample_from_data(run_files, tokenizer_dir or run_tokenizer, f"run {reference} ({', '.join(run_files)})")


def _is_request_log(path: Path) -> bool:
    if path.suffix != ".jsonl":
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and {"prompt_tokens", "completion_tokens", "latency_s"} <= set(row)


def _sample_from_request_log(path: Path, model: str | None) -> Sample:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MonitorError(f"{path}:{number}: not JSON ({exc.msg}); a request log has one JSON object per line") \
                from None
        if model is None or row.get("model") == model:
            rows.append(row)
    requests = Requests.from_rows([
        (r.get("time", 0.0), r.get("model", ""), r.get("endpoint", ""), r.get("status", 200), r.get("prompt_tokens", 0),
         r.get("completion_tokens", 0), r.get("latency_s", math.nan), r.get("time_to_first_token_s"),
         r.get("mean_logprob"), r.get("finish_reason"), r.get("error"), r.get("prompt"), r.get("completion"))
        for r in rows])
    return sample_from_requests(requests, str(path))


def _tokenizer_for(db: str | Path, tokenizer_dir: str | None, reference: str) -> str:
    if tokenizer_dir:
        return tokenizer_dir
    model_path = read_meta(db).get("model_path")
    if not model_path:
        raise MonitorError(f"--reference {reference}: a data file is tokenized with the served model's tokenizer, but "
                           f"{db} does not name the model; pass --tokenizer MODEL_DIR")
    return model_path


def _run_reference(reference: str) -> tuple[list[str], str | None]:
    """Data files and tokenizer of a run given by id or directory."""
    from tunelab.track.registry import load_run_info

    info = load_run_info(reference)
    if info is None:
        raise MonitorError(f"--reference {reference}: not a file, a window:DURATION, or a run id/directory "
                           "(see tunelab runs list)")
    data = (info.get("config") or {}).get("data") or {}
    files = data.get("eval") or data.get("train")
    if not files:
        raise MonitorError(f"--reference {reference}: run {info.get('run_id')} has no data files in its config; "
                           "give a data file as the reference instead")
    tokenizer = next((a["path"] for a in info.get("outputs", []) if a.get("kind") in ("adapter", "model")), None)
    return [files] if isinstance(files, str) else list(files), tokenizer or info.get("base_model")


def sample_from_data(files: list[str], tokenizer_dir: str | None, label: str) -> Sample:
    """Input and output lengths of data records, in tokens, as the server would count them.

    A record's prompt is everything before its last assistant turn (or the whole conversation
    when it has no answer: prompt-only files serve the prompt features), rendered with the
    model's chat template; its output is that answer plus the stop token. Plain text records
    give an input length only.

    Raises:
        MonitorError: no tokenizer; DataError: an unreadable file or one without usable records.
    """
    from tunelab.data.records import Text
    from tunelab.data.readers import load_prompts, load_records
    from tunelab.data.templates import render_prompt, resolve_template
    from tunelab.errors import DataError
    from tunelab.models.load import load_tokenizer

    if not tokenizer_dir:
        raise MonitorError(f"{label}: no tokenizer to count tokens with; pass --tokenizer MODEL_DIR")
    tokenizer = load_tokenizer(tokenizer_dir)
    template = resolve_template(tokenizer, "auto", fallback="chatml")
    try:
        prompts, _ = load_prompts(files, on_error="skip")
    except DataError:
        prompts = []  # not conversations or instructions: plain text, read below
    if prompts:
        texts = [render_prompt(tokenizer, template, p.messages, p.tools) for p in prompts]
        outputs = [len(tokenizer(p.reference, add_special_tokens=False)["input_ids"]) + 1
                   for p in prompts if p.reference is not None]
    else:
        records, _ = load_records(files, on_error="skip")
        texts, outputs = [r.text for r in records if isinstance(r, Text)], []
    values = {"input_length": np.asarray([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts],
                                         dtype=np.float64)}
    if outputs:
        values["output_length"] = np.asarray(outputs, dtype=np.float64)
    return Sample(label, values, texts)


# ---------------------------------------------------------------------------------------------
# Embeddings


def embed_texts(texts: list[str], model_dir: str, batch_size: int = 32, max_length: int = 256) -> np.ndarray:
    """L2-normalised mean-pooled last hidden states of a local encoder (a sentence-embedding model).

    Raises:
        MonitorError: the directory is not a loadable local model.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise MonitorError(f"--embedding-model {model_dir}: not a local model directory ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(vectors)


def centroid_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity of the two sets' mean vectors."""
    ca, cb = a.mean(0), b.mean(0)
    return float(1.0 - ca @ cb / max(np.linalg.norm(ca) * np.linalg.norm(cb), 1e-12))


def embedding_drift(reference: list[str], recent: list[str], model_dir: str, alpha: float = 0.01,
                    permutations: int = 200, max_texts: int = 500, seed: int = 0) -> EmbeddingDrift:
    """Centroid distance of prompt embeddings, with a seeded permutation test of "same distribution"."""
    rng = np.random.default_rng(seed)
    reference = [reference[i] for i in rng.permutation(len(reference))[:max_texts]]
    recent = [recent[i] for i in rng.permutation(len(recent))[:max_texts]]
    vectors = embed_texts(reference + recent, model_dir)
    observed = centroid_distance(vectors[:len(reference)], vectors[len(reference):])
    at_least = 0
    for _ in range(permutations):
        order = rng.permutation(len(vectors))
        shuffled = vectors[order]
        at_least += centroid_distance(shuffled[:len(reference)], shuffled[len(reference):]) >= observed
    pvalue = (at_least + 1) / (permutations + 1)
    return EmbeddingDrift(len(reference), len(recent), observed, pvalue, pvalue < alpha)
