"""Deployment: merge adapters, export (ONNX, GGUF)."""
