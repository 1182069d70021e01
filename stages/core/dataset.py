"""The datasets this project reads, in one place: image and class sizes, the four IDX files of each
split, and per dataset its public mirrors, the SHA-256 of each decompressed file and class names."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SHAPE = (28, 28)  # rows, columns of one image
NUM_CLASSES = 10
SPLIT_FILES = {  # split -> (images stem, labels stem); each file is `<stem>.gz`
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STEMS = tuple(stem for pair in SPLIT_FILES.values() for stem in pair)
# meta.json's key for the SHA-256 of each array `normalize` wrote, by path within its folder
# ("scale/x_train.npy", "y_train.npy"): the trainers refuse arrays that differ from them
ARRAY_DIGESTS = "array_sha256"


@dataclass(frozen=True)
class Dataset:
    name: str
    mirrors: tuple[str, ...]
    sha256: dict[str, str]  # file stem -> SHA-256 of the decompressed bytes
    class_names: tuple[str, ...] = tuple(str(digit) for digit in range(NUM_CLASSES))
    # the validation accuracy whose time is measured (train.target_accuracy: null means this)
    target_accuracy: float = 0.97  # MNIST's: AlgoPerf's target for this very MLP


MNIST = Dataset(
    name="mnist",
    mirrors=(  # the two torchvision uses, then the CVDF mirror TensorFlow's tutorials used
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
)
FASHION_MNIST = Dataset(
    name="fashion-mnist",
    mirrors=(  # Zalando's own bucket (torchvision's), then Keras's copy
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ),
    sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    target_accuracy=0.85,  # the default MLP reaches about 0.87 on validation in 5 epochs
)
DATASETS = {dataset.name: dataset for dataset in (MNIST, FASHION_MNIST)}
LOCAL_MIRRORS = {  # where a Debian package puts a dataset: the offline hint names it
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
}


def dataset_of_checksum(sha256: str) -> str | None:
    """Return the name of the dataset one of whose files has this SHA-256, or None."""
    for name, dataset in DATASETS.items():
        if sha256 in dataset.sha256.values():
            return name
    return None
