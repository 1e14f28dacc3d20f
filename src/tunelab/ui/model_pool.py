"""The models the playground has loaded, each behind its own serve app, the oldest unloaded first."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


@dataclass
class LoadedModel:
    """A model behind its own serve app."""

    key: str
    path: str
    name: str  # the name requests use (the adapter's name for an adapter)
    app: Any
    engine: Any
    loaded_s: float


def model_key(path: str) -> str:
    """A short stable key for a model directory."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]


def load_served_model(path: str, name: str) -> LoadedModel:
    """Load ``path`` (a model or a PEFT adapter directory) into a serve app, as ``tunelab serve`` does.

    Raises:
        TunelabError: not a model or adapter directory, or it cannot be loaded.
    """
    from peft import PeftConfig

    from tunelab.data.templates import resolve_template
    from tunelab.models.precision import device_dtype, resolve_device
    from tunelab.models.load import generation_stop_ids, is_adapter_dir, load_with_adapters
    from tunelab.serve.app import ServeSettings, create_app
    from tunelab.serve.engine import GenerationEngine, model_context_length

    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        raise TunelabError(f"{path}: no such model directory")
    started = time.perf_counter()
    if is_adapter_dir(directory):
        base = PeftConfig.from_pretrained(str(directory)).base_model_name_or_path
        adapters = {name: str(directory)}
        base_name = f"{name}-base"
    elif (directory / "config.json").is_file():
        base, adapters, base_name = str(directory), {}, name
    else:
        raise TunelabError(f"{path}: neither a model (config.json) nor a PEFT adapter (adapter_config.json)")
    device = resolve_device("auto")
    model, tokenizer = load_with_adapters(base, adapters, device, device_dtype(device))
    engine = GenerationEngine(model, tokenizer, max_batch_size=4, max_wait_ms=5.0, max_queue=16)
    settings = ServeSettings(model_name=base_name, adapters=tuple(adapters), max_tokens_limit=2048,
                             default_max_tokens=256, timeout=300.0, context_length=model_context_length(base))
    app = create_app(engine, resolve_template(tokenizer, "auto", fallback="chatml"),
                     generation_stop_ids(model.generation_config, tokenizer), settings)
    return LoadedModel(model_key(path), str(directory), name, app, engine, time.perf_counter() - started)


class ModelPool:
    """The playground's loaded models, oldest unloaded first beyond ``size``."""

    def __init__(self, size: int = 2) -> None:
        self.size = max(1, size)
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.lock = threading.Lock()

    def load(self, path: str, name: str) -> LoadedModel:
        """The model at ``path``, loading it (and unloading the oldest) when needed."""
        key = model_key(path)
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
            loaded = load_served_model(path, name)
            self.models[key] = loaded
            while len(self.models) > self.size:
                _, old = self.models.popitem(last=False)
                old.engine.close()
            return loaded

    def get(self, key: str) -> LoadedModel | None:
        """A loaded model by key."""
        return self.models.get(key)

    def close(self) -> None:
        """Stop every engine."""
        with self.lock:
            for model in self.models.values():
                model.engine.close()
            self.models.clear()
