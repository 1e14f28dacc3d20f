"""Synthetic serving traffic for the monitoring tests: per-request features, and a request store filled with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunelab.monitor.store import RequestStore
from tunelab.serve.request_log import RequestRecord


def traffic(rng: np.random.Generator, n: int, input_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Synthetic per-request features shaped like chat traffic (integer token counts)."""
    return {
        "input_length": np.round(rng.lognormal(np.log(60 * input_scale), 0.5, n)),
        "output_length": rng.poisson(30, n).astype(float) + 1,
        "perplexity": rng.lognormal(np.log(8), 0.3, n),
        "latency": rng.gamma(4, 0.05, n),
    }


def write_traffic(path: Path, start: float, features: dict[str, np.ndarray], status: int = 200) -> None:
    """Record one request per row of ``features`` in the store at ``path``, half a second apart from ``start``."""
    store = RequestStore(path, flush_seconds=0.05)
    n = len(features["input_length"])
    for k in range(n):
        store.record(RequestRecord(time=start + k * 0.5, model="tiny", endpoint="chat", status=status,
                                   prompt_tokens=int(features["input_length"][k]),
                                   completion_tokens=int(features["output_length"][k]),
                                   latency_s=float(features["latency"][k]),
                                   mean_logprob=float(-np.log(features["perplexity"][k])), finish_reason="stop"))
    store.close()
