"""The run configuration: one module per section, the objective's own section, loading and rules.

A config is one YAML file with the sections ``model``, ``method``, ``data``, ``train``, ``eval``,
``track``, ``distributed``, the key ``output_dir``, and the settings of the chosen objective in a
section named after it (``train.objective: dpo`` -> ``dpo: {beta: 0.1}``). ``section.key=value``
overrides given after the file win over it. Every mistake becomes a
:class:`~tunelab.errors.ConfigError` naming the file, the line and the key.

Modules: :mod:`.base` (what sections share; the bases of the method's and the objectives'
settings), :mod:`.model`, :mod:`.data`, :mod:`.train`, :mod:`.eval`, :mod:`.track`,
:mod:`.distributed` (one per section; the method's settings are declared by each method's file),
:mod:`.root` (the whole run), :mod:`.rules` (the cross-section rules), :mod:`.objectives` and
:mod:`.methods` (the objective and method registries, imported on first use), :mod:`.aliases`
(moved keys, other tools' names, "did you mean"), :mod:`.loading` (YAML, overrides, error
messages). Importing this package imports nothing
of tunelab above it (no train, no models, no eval, no data).
"""

from __future__ import annotations

from tunelab.config.aliases import ALIASES, MOVED_TO_OBJECTIVE_SECTION, all_keys, suggest_key
from tunelab.config.base import MethodSettings, ObjectiveSettings, Section
from tunelab.config.data import DEFAULT_MAX_LENGTH, DataConfig
from tunelab.config.distributed import DeepSpeedConfig, DistributedConfig, FSDPConfig
from tunelab.config.eval import EvalConfig
from tunelab.config.loading import config_from_dict, dump_config, load_config, parse_override
from tunelab.config.methods import method_config, method_spec, method_specs
from tunelab.config.model import ModelConfig, TinyModelConfig
from tunelab.config.objectives import objective_spec, objective_specs
from tunelab.config.root import TunelabConfig
from tunelab.config.rules import base_quantization, config_errors
from tunelab.config.track import TrackConfig
from tunelab.config.train import TrainConfig

__all__ = [
    "ALIASES", "DEFAULT_MAX_LENGTH", "MOVED_TO_OBJECTIVE_SECTION", "DataConfig", "DeepSpeedConfig",
    "DistributedConfig", "EvalConfig", "FSDPConfig", "MethodSettings", "ModelConfig", "ObjectiveSettings", "Section",
    "TinyModelConfig", "TrackConfig", "TrainConfig", "TunelabConfig", "all_keys", "base_quantization",
    "config_errors", "config_from_dict", "dump_config", "load_config", "method_config", "method_spec",
    "method_specs", "objective_spec", "objective_specs",
    "parse_override", "suggest_key",
]
