"""Local path or Hugging Face Hub id: tell them apart, and fail at once when the Hub cannot be reached.

Offline first: a name that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, or ``a/b``
where ``a`` is a local folder) is a path, and a missing one is an error at once, never a Hub
lookup. A Hub id is looked up only after one quick probe of the Hub endpoint (seconds, once per
process): with ``HF_HUB_OFFLINE`` set or the Hub unreachable, an id found in the local Hugging
Face cache loads from there (offline mode is switched on so that nothing retries the network),
and any other is an error naming it, instead of a minute of retries and "check your internet
connection".
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

PROBE_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` that is not a local path (see the module docstring)."""
    if _HUB_ID.fullmatch(name) is None or name.startswith(".") or name.endswith("."):
        return False
    first, sep, _ = name.partition("/")
    return not (sep and Path(first).is_dir())


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or when huggingface_hub loaded."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().lower() in ("1", "on", "yes", "true")


def hub_endpoint() -> str:
    """The Hub's base URL (``HF_ENDPOINT`` or https://huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@functools.cache
def hub_unreachable_reason() -> str | None:
    """None when the Hub answers a request within :data:`PROBE_TIMEOUT_S`; else why not. Probed once per process."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    import httpx

    endpoint = hub_endpoint()
    try:
        httpx.head(endpoint, timeout=PROBE_TIMEOUT_S)
    except httpx.TimeoutException:
        return f"{endpoint} did not answer within {PROBE_TIMEOUT_S:g} s"
    except httpx.HTTPError as exc:
        return f"{endpoint} is unreachable ({exc or type(exc).__name__})"
    return None


def cached_on_disk(repo_id: str, files: tuple[str, ...], repo_type: str = "model") -> bool:
    """Whether any of ``files`` of a Hub repo is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name, repo_type=repo_type), str) for name in files)


def use_offline_mode() -> None:
    """Switch huggingface_hub (and so transformers) to offline mode for this process: the cache only, no retries."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def hub_unavailable(name: str, what: str, files: tuple[str, ...], repo_type: str = "model") -> str | None:
    """Why ``name`` (a Hub id, not local) cannot be had, or None when it can (online, or cached and offline)."""
    reason = hub_unreachable_reason()
    if reason is None:
        return None
    if cached_on_disk(name, files, repo_type):
        use_offline_mode()
        return None
    return (f"{what} {name}: not a local path, and not in the local Hugging Face cache while the Hub cannot be "
            f"used ({reason}). If it is a local path, check it; if it is a Hub id, download it while online "
            f"(hf download {name}) or point {what} at a local copy")
