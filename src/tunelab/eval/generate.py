"""Batched generation with the chat template saved with the model.

The implementation lives in :mod:`tunelab.generation.local` (the data tools use it too, and data
must not import evaluation); this name stays for evaluation code and user scripts.
"""

from __future__ import annotations

from tunelab.generation.local import generate_answers

__all__ = ["generate_answers"]
