"""The TensorFlow vs PyTorch experiment: one module per DVC stage, plus what they share."""

import os

# Nothing leaves the machine: MLflow's documented switch for its usage telemetry, set before any
# stage imports MLflow (child processes, such as `mlflow ui` started from tests, inherit it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
