"""Run tracking: ``run.json`` for every train, eval, merge, export and serve, a run registry, lineage."""
