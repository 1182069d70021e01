"""The TensorFlow vs PyTorch experiment: one module per DVC stage, plus what they share."""
