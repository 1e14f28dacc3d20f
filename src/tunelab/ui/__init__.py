"""``tunelab ui``: one local web app over the registry, training runs, data, evaluations, models and monitoring."""
