"""Stage `normalize`: the numbers of each scheme, the stratified split, the outputs and the run."""

import hashlib
import json

import mlflow
import numpy as np
import pytest

from stages import download, normalize
from stages.core.common import StageError
from stages.core.preprocess import apply_scheme, class_counts, scheme_constants, split_validation
from tests.conftest import run_stage


def test_scale_and_symmetric_numbers():
    pixels = np.array([[[0, 51, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(
        apply_scheme(pixels, *scheme_constants("scale", pixels)), [[[0.0, 0.2, 1.0]]], rtol=1e-6
    )
    np.testing.assert_allclose(
        apply_scheme(pixels, *scheme_constants("symmetric", pixels)),
        [[[-1.0, -0.6, 1.0]]],
        rtol=1e-6,
    )
    assert apply_scheme(pixels, 0.0, 1.0).dtype == np.float32


def test_standardize_uses_the_training_split_only():
    train = np.array([[[0, 255]]], dtype=np.uint8)  # mean 0.5, std 0.5 after /255
    mean, std = scheme_constants("standardize", train)
    assert (mean, std) == pytest.approx((0.5, 0.5))
    test = np.array([[[255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(apply_scheme(test, mean, std), [[[1.0, 1.0]]], rtol=1e-6)
    np.testing.assert_allclose(apply_scheme(train, mean, std).mean(), 0.0, atol=1e-6)


def test_split_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(10), 100)
    train, val = split_validation(labels, 200, seed=3)
    assert np.bincount(labels[val]).tolist() == [20] * 10
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1000
    again_train, again_val = split_validation(labels, 200, seed=3)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, split_validation(labels, 200, seed=4)[1])


def test_zero_val_size_means_no_validation_split():
    train, val = split_validation(np.arange(10) % 2, 0, seed=0)
    assert len(train) == 10 and len(val) == 0


def test_stage_outputs_and_mlflow_run(workspace, tiny_idx, monkeypatch, params_dict):
    folder, dataset = tiny_idx
    monkeypatch.setitem(download.DATASETS, "mnist", dataset)
    monkeypatch.setenv("DATASET_MIRROR", str(folder))
    run_stage(download.main, out=workspace / "raw", params=workspace / "params.yaml")
    run_stage(
        normalize.main,
        raw=workspace / "raw",
        out=workspace / "processed",
        params=workspace / "params.yaml",
    )

    processed = workspace / "processed"
    x_train = np.load(processed / "scale" / "x_train.npy", mmap_mode="r")  # memory-mappable
    assert isinstance(x_train, np.memmap) and x_train.dtype == np.float32
    assert x_train.shape == (300, 28, 28) and float(x_train.max()) == 1.0
    assert np.load(processed / "y_val.npy").shape == (100,)
    assert np.load(processed / "scale" / "x_test.npy").shape == (100, 28, 28)
    meta = json.loads((processed / "meta.json").read_text())
    assert meta["split_sizes"] == {"train": 300, "val": 100, "test": 100}
    assert meta["class_counts"]["val"] == [10] * 10
    arrays = sorted(p.relative_to(processed).as_posix() for p in processed.rglob("*.npy"))
    assert sorted(meta["array_sha256"]) == arrays and len(arrays) == 6  # every array, by name
    for name, digest in meta["array_sha256"].items():
        assert hashlib.sha256((processed / name).read_bytes()).hexdigest() == digest

    run = mlflow.get_run(meta["mlflow_run_id"])
    assert run.info.run_name == "normalize" and run.info.status == "FINISHED"
    assert run.data.metrics["val_size"] == 100
    assert run.data.params["scale.mean"] == "0.0"
    assert run.data.tags["download_run_id"] == meta["download_run_id"]
    assert run.inputs.dataset_inputs[0].dataset.digest == meta["train_digest"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"samples.png", "meta.json"} <= artifacts


def test_class_counts_list_every_class_even_when_absent():
    assert class_counts(np.array([0, 0, 3, 7])) == [2, 0, 0, 1, 0, 0, 0, 1, 0, 0]


def test_standardize_refuses_images_without_spread():
    with pytest.raises(StageError, match=r"no spread \(std 0\).*use scheme 'scale'"):
        scheme_constants("standardize", np.full((4, 28, 28), 7, np.uint8))
    mean, std = scheme_constants("standardize", np.array([[0, 255]], np.uint8))
    assert (mean, std) == (0.5, 0.5)


@pytest.mark.parametrize(("val_size", "fits"), [(1, False), (2, True), (8, True), (9, False)])
def test_val_size_must_leave_each_class_an_image_on_both_sides(val_size, fits):
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])  # 2 classes of 5: val_size 2..8
    if fits:
        train, val = split_validation(labels, val_size, seed=0)
        assert len(val) == val_size and set(labels[val]) == set(labels[train]) == {0, 1}
    else:
        with pytest.raises(
            StageError,
            match=rf"normalize.val_size={val_size} cannot be split stratified from 10 training "
            "images of 2 classes: .* Set it between 2 and 8, or to 0",
        ):
            split_validation(labels, val_size, seed=0)


def test_apply_scheme_skips_the_arithmetic_only_for_mean_0_and_std_1():
    images = np.array([[[0, 51, 255]]], np.uint8)
    np.testing.assert_allclose(apply_scheme(images, 0.0, 1.0), [[[0.0, 0.2, 1.0]]], rtol=1e-6)
    np.testing.assert_allclose(apply_scheme(images, 0.0, 0.5), [[[0.0, 0.4, 2.0]]], rtol=1e-6)
    np.testing.assert_allclose(apply_scheme(images, 0.2, 1.0), [[[-0.2, 0.0, 0.8]]], atol=1e-6)
    assert apply_scheme(images, 0.2, 1.0).dtype == np.float32
