"""The file layout the stages share, in one place: split names, file names and registered model names."""

from __future__ import annotations

SPLITS = ("train", "val", "test")
MODEL_NAME = "mnist-mlp-{framework}"  # one registered MLflow model per framework
# The `export` stage's files, one per deployment format, and how a reader names each
FILE_NAMES = {
    "onnx": "model.onnx",
    "saved_model": "saved_model",  # a folder: what TensorFlow Serving loads
    "litert": "model.tflite",
    "torch_export": "model.pt2",
}
FORMAT_LABELS = {
    "onnx": "ONNX",
    "saved_model": "SavedModel",
    "litert": "LiteRT (.tflite)",
    "torch_export": "torch.export (.pt2)",
}
RUNTIMES = {
    "onnx": "ONNX Runtime",
    "saved_model": "tf.saved_model.load",
    "litert": "LiteRT interpreter (ai_edge_litert)",
    "torch_export": "torch.export.load",
}
