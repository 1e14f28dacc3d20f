"""Evaluation: generation and metrics."""
