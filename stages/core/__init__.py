"""The framework-free core: config, dataset facts and file layout, I/O, statistics, the comparison.
Imports neither TensorFlow, torch nor MLflow."""
