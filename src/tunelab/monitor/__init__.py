"""Production monitoring: the request store, drift tests, alerts and the HTML report."""
