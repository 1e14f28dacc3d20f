"""Training: the engine (one loop), optimisation, checkpoints and objectives."""
