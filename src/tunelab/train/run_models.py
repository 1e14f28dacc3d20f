"""What a training config's run left behind, as ``merge``, ``export`` and ``serve --config`` read it.

``--config RUN.yaml`` means the same for every command that takes it: a training config, and the run
it describes. Its model is ``output_dir/final``: a plain model where the base itself trained
(full, freeze), a PEFT adapter on ``model.path`` otherwise (lora, qlora, prefix, prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.models.methods import method_spec
from tunelab.config.root import TunelabConfig
from tunelab.errors import TunelabError


@dataclass(frozen=True)
class RunModels:
    """The models of a configured run.

    Attributes:
        name: the run's name (the name of its ``output_dir``).
        method: ``method.type``.
        base: ``model.path``, the model the run started from.
        final: ``output_dir/final``, what the run saved.
        adapter: whether ``final`` is an adapter on ``base`` (otherwise it is a whole model).
    """

    name: str
    method: str
    base: str
    final: Path
    adapter: bool

    def trained_final(self, config_path: str) -> Path:
        """``final``, checked to exist (a clear error says to train first otherwise)."""
        if not self.final.is_dir():
            raise TunelabError(f"--config {config_path}: the run has no {self.final} yet "
                               f"(train it first: tunelab train {config_path})")
        return self.final


def run_models(config: TunelabConfig) -> RunModels:
    """The base, the final model and whether it is an adapter, of the run ``config`` describes."""
    output_dir = Path(config.output_dir)
    return RunModels(name=output_dir.name or "run", method=config.method.type, base=config.model.path,
                     final=output_dir / "final", adapter=not method_spec(config.method.type).trains_base)
