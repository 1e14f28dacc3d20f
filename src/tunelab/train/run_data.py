"""A run's data exactly as ``tunelab train`` tokenizes it (``tunelab data preview`` and the UI's data page)."""

from __future__ import annotations

from typing import Any

from tunelab.config import TunelabConfig
from tunelab.data.kinds import check_data_kind
from tunelab.data.tokenize import TokenizedData, prepare_data
from tunelab.models.load import load_tokenizer, stop_token_ids
from tunelab.train.objectives.registry import objective_data_kinds, objective_spec


def prepare_run_data(config: TunelabConfig) -> tuple[Any, TokenizedData]:
    """The config's tokenizer and its train/eval data rendered, masked and tokenized for its objective.

    The files' kind of records is checked against the objective's first (a clear error instead of
    a tokenizer failure deep inside).
    """
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code, config.model.revision)
    stop_ids = stop_token_ids(config.model.path, tokenizer, config.model.trust_remote_code)
    check_data_kind([*config.data.train, *(config.data.eval or [])], config.train.objective, objective_data_kinds())
    data = prepare_data(config.data, objective_spec(config.train.objective).data, config.train.seed, tokenizer,
                        stop_ids)
    return tokenizer, data
