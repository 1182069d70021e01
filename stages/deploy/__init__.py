"""Exports and serving, framework-free: what both export halves share and `mlflow models serve`."""
