"""Text generation behind one interface: a local Hugging Face model or an OpenAI-compatible API.

- :mod:`tunelab.generation.backends`: the backends (:class:`~tunelab.generation.backends.OpenAIBackend`,
  :class:`~tunelab.generation.backends.HFBackend`) and :func:`~tunelab.generation.backends.parse_backend_spec`.
- :mod:`tunelab.generation.local`: batched ``generate`` with the model's chat template.
- :mod:`tunelab.generation.cache`: the on-disk reply cache (a re-run costs no calls).
- :mod:`tunelab.generation.runner`: :class:`~tunelab.generation.runner.Generator`, which runs many
  requests through a backend with the cache, a concurrency limit, retries of unusable replies and
  per-request failures that never stop the job.

This package sits beside ``models``: the data tools (augment, synth) and evaluation (the LLM
judge) both build on it, and it imports neither. Nothing here imports torch until a local model
is used.
"""
