"""The file layout the stages share, in one place: split names, file names and registered model names."""

from __future__ import annotations

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"  # `download`'s record of its files, in its output folder
META_FILE = "meta.json"  # `normalize`'s record of its arrays, in its output folder
SAMPLES_FILE = "samples.png"  # `normalize`'s grid of sample images
# `evaluate`'s report folder: the report, its page, and its figures in the order it shows them
REPORT_FILE = "comparison.md"
REPORT_PAGE = "comparison.html"
LEARNING_CURVES_PLOT = "learning_curves.png"
TIME_TO_ACCURACY_PLOT = "time_to_accuracy.png"
CONFUSIONS_PLOT = "confusion_matrices.png"
PER_CLASS_PLOT = "per_class_accuracy.png"
DISAGREEMENTS_PLOT = "disagreements.png"
SPEED_MEMORY_PLOT = "speed_memory.png"
PLOTS = (
    LEARNING_CURVES_PLOT,
    TIME_TO_ACCURACY_PLOT,
    CONFUSIONS_PLOT,
    PER_CLASS_PLOT,
    DISAGREEMENTS_PLOT,
    SPEED_MEMORY_PLOT,
)
DEPLOYMENT_PLOT = "deployment.png"  # only with the `export` stage's metrics
MODEL_NAME = "mnist-{kind}-{framework}"  # one registered MLflow model per model.kind and framework


def images_file(split: str) -> str:
    """Return the name of a split's (N, 28, 28) float32 images, in a scheme's folder."""
    return f"x_{split}.npy"


def labels_file(split: str) -> str:
    """Return the name of a split's int64 labels, in `normalize`'s output folder."""
    return f"y_{split}.npy"


def model_file(seed: int, suffix: str) -> str:
    """Return the name of a trainer's saved model for `seed` (`suffix` its native format's)."""
    return f"seed-{seed}{suffix}"


def registered_model_name(framework: str, kind: str) -> str:
    """Return the name of the registered MLflow model of a framework and model.kind, so the MLP's
    versions and the CNN's never mix: mnist-mlp-tf, mnist-cnn-torch, ..."""
    return MODEL_NAME.format(kind=kind, framework=framework)


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
