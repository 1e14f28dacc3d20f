"""Playground: chat with any final model or adapter through the same server stack as ``tunelab serve``.

A chosen model is loaded once into a :class:`~tunelab.serve.engine.GenerationEngine` behind the
OpenAI-compatible app of :mod:`tunelab.serve.app` (an adapter is served on top of its base, as
``tunelab serve --adapter NAME=DIR`` serves it), and the browser talks to that app under
``/api/playground/m/KEY/v1/...``: the same template, stop tokens, sampling and streaming as a
deployed model. At most ``max_models`` stay loaded (two for side by side); the oldest goes first.

A side-by-side judgement is saved as a human label that ``tunelab compare --judge labels`` reads:
``labels.jsonl`` rows ``{id, model_a, model_b, winner}`` plus each model's answer in
``predictions/NAME.jsonl`` under the same id (the ``--predictions NAME=FILE`` of that command).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from tunelab.errors import TunelabError
from tunelab.ui.model_pool import ModelPool
from tunelab.ui.state import UIState, ui_state

router = APIRouter(prefix="/api/playground")
MOUNT = "/api/playground/m/"


def safe_name(text: str) -> str:
    """A model name usable as a file name and an API model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


class PlaygroundDispatch:
    """ASGI: ``/api/playground/m/KEY/...`` goes to that model's serve app; everything else to ``app``."""

    def __init__(self, app: Any, pool: ModelPool) -> None:
        self.app, self.pool = app, pool

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(MOUNT):
            await self.app(scope, receive, send)
            return
        key, _, rest = path[len(MOUNT):].partition("/")
        loaded = self.pool.get(key)
        if loaded is None:
            body = json.dumps({"error": {"message": "this model is not loaded (choose it again in the playground)",
                                         "type": "invalid_request_error"}}).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        inner = dict(scope, path="/" + rest, raw_path=("/" + rest).encode(), root_path="")
        await loaded.app(inner, receive, send)


def _known_models(state: UIState) -> list[dict[str, Any]]:
    """Final models and adapters the registry knows (training, merges), newest first, that still exist."""
    if not state.settings.registry.is_file():
        return []
    seen, models = set(), []
    for info in state.registry().list(limit=2000):
        if info["kind"] not in ("train", "merge"):
            continue
        for output in info.get("outputs") or []:
            if output["kind"] in ("model", "adapter") and output["path"] not in seen and Path(output["path"]).is_dir():
                seen.add(output["path"])
                label = f"{info['run_id']} ({output['kind']}, {info.get('objective') or info['kind']})"
                models.append({"path": output["path"], "name": safe_name(info["run_id"]), "label": label,
                               "kind": output["kind"]})
    return models


@router.get("/models")
def list_models(state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Models and adapters to chat with, and which are loaded."""
    loaded = [{"key": m.key, "path": m.path, "name": m.name} for m in state.models.models.values()]
    return {"models": _known_models(state), "loaded": loaded}


class LoadBody(BaseModel):
    """A model to load: a directory, and optionally the name to show and label it by."""

    path: str = Field(min_length=1)
    name: str | None = None


@router.post("/load")
async def load_model(body: LoadBody, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Load a model (off the event loop) and return the key its chat endpoint lives under."""
    known = {m["path"]: m["name"] for m in _known_models(state)}
    resolved = str(Path(body.path).expanduser().resolve())
    default = known.get(resolved) or safe_name(Path(resolved).parent.name if Path(resolved).name == "final"
                                               else Path(resolved).name)
    name = safe_name(body.name) if body.name else default
    loaded = await asyncio.get_running_loop().run_in_executor(None, state.models.load, body.path, name)
    return {"key": loaded.key, "name": loaded.name, "path": loaded.path, "loaded_s": round(loaded.loaded_s, 2),
            "chat_url": f"{MOUNT}{loaded.key}/v1/chat/completions"}


class Judgement(BaseModel):
    """A side-by-side judgement of two answers to the same prompt."""

    messages: list[dict[str, str]] = Field(min_length=1)
    model_a: str = Field(min_length=1)
    model_b: str = Field(min_length=1)
    answer_a: str
    answer_b: str
    winner: str  # "a", "b" or "tie"


def labels_dir(state: UIState) -> Path:
    """Where the playground keeps its labels and predictions."""
    return state.settings.state_dir / "playground"


@router.post("/label")
def save_label(body: Judgement, state: UIState = Depends(ui_state)) -> dict[str, Any]:
    """Append a human label and both answers; return the ``tunelab compare`` command that reads them."""
    if body.winner not in ("a", "b", "tie"):
        raise TunelabError(f"winner {body.winner!r}: expected a, b or tie")
    a, b = safe_name(body.model_a), safe_name(body.model_b)
    if a == b:
        raise TunelabError("a judgement needs two different models")
    out = labels_dir(state)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    prompt = body.messages[-1].get("content", "")
    digest = hashlib.sha1(json.dumps(body.messages, sort_keys=True).encode()).hexdigest()[:12]
    example_id = f"pg-{digest}"
    for name, answer in ((a, body.answer_a), (b, body.answer_b)):
        with (out / "predictions" / f"{name}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"id": example_id, "prompt": prompt, "messages": body.messages,
                                     "prediction": answer}) + "\n")
    winner = {"a": a, "b": b, "tie": "tie"}[body.winner]
    labels = out / "labels.jsonl"
    with labels.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": example_id, "model_a": a, "model_b": b, "winner": winner,
                                 "prompt": prompt}) + "\n")
    command = (f"tunelab compare --judge labels --labels {labels} --predictions {a}={out / 'predictions' / (a + '.jsonl')}"
               f" --predictions {b}={out / 'predictions' / (b + '.jsonl')} --out OUT")
    count = sum(1 for _ in labels.open(encoding="utf-8"))
    return {"id": example_id, "labels": str(labels), "count": count, "command": command}
