"""A trainer stage, framework-free: the seed loop, measurements, the summary, MLflow logging."""
