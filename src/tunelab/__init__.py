"""tunelab: one tool for the whole life of a fine-tuned LLM."""

__version__ = "0.1.0"
