"""The UI's ASGI app: JSON routers (runs, launch, data, evaluate, playground, monitor) and the page.

The page is one HTML file and vanilla JavaScript modules shipped in ``tunelab/ui/static`` (no CDN,
no build step). Every error a user can cause comes back as ``{"error": message}`` with a 4xx
status (5xx for a registry or store that cannot be read, or a bug, whose traceback goes to the
server log); the server keeps serving either way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from tunelab.errors import TunelabError
from tunelab.track.registry import TrackError
from tunelab.ui import data, evaluate, launch, monitor, playground, runs
from tunelab.ui.auth import UIGuard
from tunelab.ui.state import UISettings, UIState

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger("tunelab.ui")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_ui_app(settings: UISettings) -> Any:
    """The UI as an ASGI app (FastAPI behind the token/host guard and the playground's model dispatch)."""
    state = UIState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ui = state
    for module in (runs, launch, data, evaluate, playground, monitor):
        app.include_router(module.router)

    @app.exception_handler(TrackError)
    async def _registry_error(_: Request, exc: TrackError) -> JSONResponse:
        return _error(404 if str(exc).startswith(("no run ", "run id ")) else 503, str(exc))

    @app.exception_handler(TunelabError)
    async def _user_error(_: Request, exc: TunelabError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("tunelab ui: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the traceback")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "registry": str(settings.registry)}

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return UIGuard(playground.PlaygroundDispatch(app, state.models), settings.token)
