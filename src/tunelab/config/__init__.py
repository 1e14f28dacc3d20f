"""The run configuration: one module per section, the objective's own section, loading and rules.

A config is one YAML file with the sections ``model``, ``method``, ``data``, ``train``, ``eval``,
``track``, ``distributed``, the key ``output_dir``, and the settings of the chosen objective in a
section named after it (``train.objective: dpo`` -> ``dpo: {beta: 0.1}``). ``section.key=value``
overrides given after the file win over it. Every mistake becomes a
:class:`~tunelab.errors.ConfigError` naming the file, the line and the key.

Modules: :mod:`.base` (what sections share), :mod:`.model`, :mod:`.method`, :mod:`.data`,
:mod:`.train`, :mod:`.eval`, :mod:`.track`, :mod:`.distributed` (one per section), :mod:`.root`
(the whole run), :mod:`.rules` (the cross-section rules), :mod:`.objectives` (the objective
registry, imported on first use), :mod:`.aliases` (moved keys, other tools' names, "did you
mean"), :mod:`.loading` (YAML, overrides, error messages). Importing this package imports nothing
of tunelab above it (no train, no eval, no data).
"""

from __future__ import annotations

from tunelab.config.aliases import ALIASES, MOVED_TO_OBJECTIVE_SECTION, all_keys, suggest_key
from tunelab.config.base import ObjectiveSettings, Section
from tunelab.config.data import DEFAULT_MAX_LENGTH, DataConfig
from tunelab.config.distributed import DeepSpeedConfig, DistributedConfig, FSDPConfig
from tunelab.config.eval import EvalConfig
from tunelab.config.loading import config_from_dict, dump_config, load_config, parse_override
from tunelab.config.method import MethodConfig
from tunelab.config.model import ModelConfig, TinyModelConfig
from tunelab.config.objectives import objective_spec, objective_specs
from tunelab.config.root import TunelabConfig
from tunelab.config.rules import base_quantization, config_errors
from tunelab.config.track import TrackConfig
from tunelab.config.train import TrainConfig

__all__ = [
    "ALIASES", "DEFAULT_MAX_LENGTH", "MOVED_TO_OBJECTIVE_SECTION", "DataConfig", "DeepSpeedConfig",
    "DistributedConfig", "EvalConfig", "FSDPConfig", "MethodConfig", "ModelConfig", "ObjectiveSettings", "Section",
    "TinyModelConfig", "TrackConfig", "TrainConfig", "TunelabConfig", "all_keys", "base_quantization",
    "config_errors", "config_from_dict", "dump_config", "load_config", "objective_spec", "objective_specs",
    "parse_override", "suggest_key",
]
