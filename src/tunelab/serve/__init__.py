"""Serving: an OpenAI-compatible HTTP API over batched generation."""
