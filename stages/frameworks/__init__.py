"""The only modules that import TensorFlow or torch: per framework a trainer and an export half,
mirrored file for file."""
