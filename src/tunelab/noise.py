"""Third-party log lines that are noise to a tunelab user, dropped at the logger that emits them.

Each entry names the logger and the start of the message, so nothing else from that library is
hidden. Installed when :mod:`tunelab` is imported (before peft, which imports bitsandbytes).
"""

from __future__ import annotations

import logging

# (logger, message prefix). Why each is noise:
NOISE: tuple[tuple[str, str], ...] = (
    # bitsandbytes (imported by peft on every command) tries to fetch an optional fused 4-bit CPU
    # kernel from the Hub at import on CPUs with AVX512-BF16, and logs a warning when it cannot
    # (offline, or not allow-listed); it then uses its own CPU path, which is what runs anyway.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # The same attempt with HF_HUB_OFFLINE set.
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)


class _DropPrefix(logging.Filter):
    """Drops records whose message starts with a prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party_logs() -> None:
    """Install the filters of :data:`NOISE` (idempotent)."""
    for name, prefix in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
