"""The one spec both trainers build: layers, shapes, parameter counts, shared weights, and the
conversion between Keras's layout and PyTorch's, checked with numpy alone."""

import numpy as np
import pytest

from stages.core.config import ParamsError, parse_params
from stages.core.network import (
    Activation,
    Channels,
    Conv,
    Dense,
    Dropout,
    Flatten,
    MaxPool,
    expected_parameters,
    feature_shapes,
    forward_flops,
    layers,
    shared_weights,
    torch_layout,
    weighted_layers,
)


def model(**settings):
    """Return a validated model section with `settings` over the defaults."""
    return parse_params({"model": settings}).model


def test_the_mlp_is_the_blogs_network():
    mlp = model()
    assert layers(mlp) == (Flatten(), Dense(128), Activation("relu"), Dropout(0.2), Dense(10))
    assert expected_parameters(mlp) == 101_770


def test_the_cnn_is_keras_mnist_convnet_example():
    cnn = model(kind="cnn")
    assert layers(cnn) == (
        Channels(),
        Conv(32, 3),
        Activation("relu"),
        MaxPool(2),
        Conv(64, 3),
        Activation("relu"),
        MaxPool(2),
        Flatten(),
        Dropout(0.5),
        Dense(10),
    )
    # 28 -> 26 -> 13 -> 11 -> 5: the shapes Keras's example prints in its summary
    assert feature_shapes(cnn)[-4:] == [(5, 5, 64), (1600,), (1600,), (10,)]
    assert expected_parameters(cnn) == 34_826  # 320 + 18,496 + 16,010
    assert [w.kernel_shape for w in weighted_layers(cnn)] == [
        (3, 3, 1, 32),
        (3, 3, 32, 64),
        (1600, 10),
    ]


def test_forward_flops_count_each_multiply_add_twice():
    assert forward_flops(model()) == 2 * (784 * 128 + 128 * 10)
    # 26x26x32 outputs of 9 inputs, 11x11x64 of 9x32, then 1600 -> 10
    assert forward_flops(model(kind="cnn")) == 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 16_000)


def test_cnn_settings_shape_the_network():
    cnn = model(
        kind="cnn", cnn={"filters": [8], "kernel_size": 5, "pool_size": 4, "dropout_rate": 0.1}
    )
    assert feature_shapes(cnn)[-4:] == [(6, 6, 8), (288,), (288,), (10,)]  # (28 - 4) // 4 = 6
    assert expected_parameters(cnn) == 5 * 5 * 8 + 8 + 288 * 10 + 10


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "cnn", "hidden_units": [64]}, "hidden_units=[64] has no effect with kind cnn"),
        ({"kind": "cnn", "dropout_rate": 0.3}, "dropout_rate=0.3 has no effect with kind cnn"),
        ({"cnn": {"filters": [16]}}, "model.cnn.filters=[16] has no effect with kind mlp"),
        ({"cnn": {"dropout_rate": 0.2}}, "model.cnn.dropout_rate=0.2 has no effect with kind mlp"),
        ({"kind": "cnn", "cnn": {"filters": [8] * 4}}, "after block 4 of 4"),
        ({"kind": "cnn", "cnn": {"kernel_size": 0}}, "kernel_size"),
        ({"kind": "convnet"}, "'mlp' or 'cnn'"),
    ],
)
def test_a_setting_for_the_other_kind_is_refused(settings, message):
    with pytest.raises(ParamsError, match="model") as error:
        model(**settings)
    assert message in str(error.value)


def test_shared_weights_are_glorot_with_keras_fans():
    weights = shared_weights(model(kind="cnn"), seed=0)
    conv, dense = weights[1][0], weights[2][0]
    limit = np.sqrt(6 / (9 * 32 + 9 * 64))  # receptive field x in, receptive field x out
    assert conv.shape == (3, 3, 32, 64) and 0.95 * limit < np.abs(conv).max() <= limit
    assert dense.shape == (1600, 10) and np.abs(dense).max() <= np.sqrt(6 / 1610)
    assert all(not bias.any() for _, bias in weights)
    mlp = shared_weights(model(), seed=0)
    assert [kernel.shape for kernel, _ in mlp] == [(784, 128), (128, 10)]


def _keras_forward(x, kernel):
    """A 'valid' convolution of (h, w, in) by an (kh, kw, in, out) kernel, channels last."""
    size = kernel.shape[0]
    out = x.shape[0] - size + 1
    return np.array(
        [
            [np.einsum("hwi,hwio->o", x[r : r + size, c : c + size], kernel) for c in range(out)]
            for r in range(out)
        ]
    )


def _torch_forward(x, kernel):
    """The same convolution, channels first: (in, h, w) by an (out, in, kh, kw) kernel."""
    size = kernel.shape[-1]
    out = x.shape[-1] - size + 1
    return np.array(
        [
            [np.einsum("ihw,oihw->o", x[:, r : r + size, c : c + size], kernel) for c in range(out)]
            for r in range(out)
        ]
    ).transpose(2, 0, 1)


def test_torch_layout_computes_the_same_function_in_channels_first():
    # a tiny CNN, run by hand in both layouts: conv (HWIO against OIHW), then flatten
    # ((h, w, c) against (c, h, w)), then dense: the same logits from the converted weights
    cnn = model(kind="cnn", cnn={"filters": [3], "kernel_size": 3, "pool_size": 1})
    weights = shared_weights(cnn, seed=1)
    converted = torch_layout(cnn, weights)
    (conv_k, _), (dense_k, _) = weights
    (conv_t, _), (dense_t, _) = converted
    assert conv_t.shape == (3, 1, 3, 3) and dense_t.shape == (10, 26 * 26 * 3)
    image = np.random.default_rng(2).random((28, 28, 1)).astype(np.float64)
    keras_map = _keras_forward(image, conv_k.astype(np.float64))  # (26, 26, 3)
    torch_map = _torch_forward(image.transpose(2, 0, 1), conv_t.astype(np.float64))  # (3, 26, 26)
    np.testing.assert_allclose(keras_map, torch_map.transpose(1, 2, 0), rtol=1e-12)
    keras_logits = keras_map.reshape(-1) @ dense_k  # NHWC flatten
    torch_logits = dense_t @ torch_map.reshape(-1)  # NCHW flatten
    np.testing.assert_allclose(keras_logits, torch_logits, rtol=1e-6)
    # without the reordering of the dense rows the logits differ: the test can fail
    assert not np.allclose(keras_logits, dense_k.T @ torch_map.reshape(-1), rtol=1e-3)


def test_torch_layout_of_the_mlp_is_the_transpose():
    mlp = model(hidden_units=[5])
    weights = shared_weights(mlp, seed=0)
    for (kernel, bias), (converted, same_bias) in zip(
        weights, torch_layout(mlp, weights), strict=True
    ):
        np.testing.assert_array_equal(converted, kernel.T)
        assert same_bias is bias
