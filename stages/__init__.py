"""The TensorFlow vs PyTorch experiment: one module per DVC stage, plus what they share."""

import os

# MLflow decides at `import mlflow` whether to send usage telemetry, so its documented switch is
# set here, before any stage imports it; set MLFLOW_DISABLE_TELEMETRY=false to send it anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
