"""An append-only JSON-lines cache of generated replies: a re-run of a job costs no calls.

One object per line, ``{"key": sha256, <name_field>: backend name, "reply": text}``. Each reply is
appended (and flushed) the moment it arrives, so a job stopped at any point (Ctrl-C, a crash, a
killed machine) keeps everything generated before it, and running it again asks only for the
rest. A line cut by a crash is skipped when reading (that one reply is asked again) and the next
write starts on a fresh line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError, read_user_text

CACHE_VERSION = "tunelab-generation-1"


def default_cache_path(backend_name: str) -> Path:
    """``$TUNELAB_CACHE/generations/<hash of the backend name>.jsonl`` (``~/.cache/tunelab`` by default)."""
    root = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))
    digest = hashlib.sha256(backend_name.encode("utf-8")).hexdigest()[:16]
    return root / "generations" / f"{digest}.jsonl"


def request_key(backend_name: str, messages: list[dict], params: dict[str, Any] | None = None,
                version: str = CACHE_VERSION) -> str:
    """sha256 of the backend name (which names the model), the full messages and the sampling."""
    parts: list[Any] = [version, backend_name, messages]
    if params is not None:
        parts.append(params)
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Replies by key, in memory and (with ``path``) in a JSON-lines file.

    Args:
        path: the cache file, created on the first write; None keeps replies in memory only.
        name_field: the field that names the backend in each line (``backend``; the LLM judge
            writes ``judge``).
        error: the error type raised for a cache file that cannot be read.

    Raises:
        TunelabError: the file exists but is not UTF-8 text (or is a directory).
    """

    def __init__(self, path: str | Path | None = None, name_field: str = "backend",
                 error: type[TunelabError] = TunelabError) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self.name_field = name_field
        self._replies: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            text = read_user_text(self.path, "generation cache", error)
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    self._replies[entry["key"]] = entry["reply"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: that reply is asked again

    def __contains__(self, key: str) -> bool:
        return key in self._replies

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or None."""
        return self._replies.get(key)

    def put(self, key: str, backend_name: str, reply: str) -> None:
        """Remember a reply and append it to the file at once."""
        with self._lock:
            self._replies[key] = reply
            if self.path is None:
                return
            line = json.dumps({"key": key, self.name_field: backend_name, "reply": reply}, ensure_ascii=False) + "\n"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() > 0:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":  # the last line was cut: start a fresh one
                        line = "\n" + line
                handle.write(line.encode("utf-8"))
