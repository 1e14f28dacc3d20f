"""tunelab: one tool for the whole life of a fine-tuned LLM."""

from tunelab.noise import quiet_third_party_logs

__version__ = "0.1.0"

quiet_third_party_logs()
