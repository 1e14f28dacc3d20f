"""The data tools behind ``tunelab data convert|build|cot|clean|stats|split|augment|synth``.

They read through the training pipeline's readers (:mod:`tunelab.data.readers`) and write canonical
JSONL; the generation-backed ones (augment, synth) use :mod:`tunelab.generation`. Nothing in the
training pipeline (``data/``) or in ``train/`` imports them.
"""
