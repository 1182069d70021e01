"""The networks both trainers build, as one framework-free spec per `model.kind`: the layers in
order, their shapes and parameter counts, the shared initial weights, and the one conversion
between Keras's weight layout and PyTorch's.

Keras keeps images channels-last (NHWC) and convolution kernels as (height, width, in, out);
PyTorch keeps them channels-first (NCHW) and kernels as (out, in, height, width). A Dense layer
after a Flatten therefore reads the same features in another order: (h, w, c) in Keras, (c, h, w)
in PyTorch. `torch_layout` is the only place that converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from stages.core.config import ModelConfig
from stages.core.contract import Weights
from stages.core.dataset import IMAGE_SHAPE, NUM_CLASSES


@dataclass(frozen=True)
class Channels:
    """(N, 28, 28) images as one channel: (N, 28, 28, 1) in Keras, (N, 1, 28, 28) in PyTorch."""


@dataclass(frozen=True)
class Conv:
    """A 2-D convolution, stride 1, no padding ('valid'): each side shrinks by kernel_size - 1."""

    filters: int
    kernel_size: int


@dataclass(frozen=True)
class MaxPool:
    """Max pooling with a window and stride of pool_size, no padding (the remainder is dropped)."""

    pool_size: int


@dataclass(frozen=True)
class Flatten:
    """Every feature of an image in one vector: (h, w, c) order in Keras, (c, h, w) in PyTorch."""


@dataclass(frozen=True)
class Dense:
    units: int


@dataclass(frozen=True)
class Activation:
    name: str


@dataclass(frozen=True)
class Dropout:
    rate: float


Layer = Channels | Conv | MaxPool | Flatten | Dense | Activation | Dropout


def layers(model: ModelConfig) -> tuple[Layer, ...]:
    """Return the network's layers in order, input to logits, for `model.kind`."""
    if model.kind == "cnn":  # Keras's MNIST convnet example with the default model.cnn
        stack: list[Layer] = [Channels()]
        for filters in model.cnn.filters:
            stack += [
                Conv(filters, model.cnn.kernel_size),
                Activation(model.activation),
                MaxPool(model.cnn.pool_size),
            ]
        return (*stack, Flatten(), Dropout(model.cnn.dropout_rate), Dense(NUM_CLASSES))
    stack = [Flatten()]
    for units in model.hidden_units:
        stack += [Dense(units), Activation(model.activation), Dropout(model.dropout_rate)]
    return (*stack, Dense(NUM_CLASSES))


Shape = tuple[int, ...]  # (height, width) before Channels, (height, width, channels), (features,)


def output_shape(layer: Layer, shape: Shape) -> Shape:
    """Return the shape of one image after `layer`, channels last."""
    match layer:
        case Channels():
            return (*shape, 1)
        case Conv(filters, kernel_size):
            return (shape[0] - kernel_size + 1, shape[1] - kernel_size + 1, filters)
        case MaxPool(pool_size):
            return (shape[0] // pool_size, shape[1] // pool_size, shape[2])
        case Flatten():
            return (prod(shape),)
        case Dense(units):
            return (units,)
    return shape


def feature_shapes(model: ModelConfig) -> list[Shape]:
    """Return the shape of one image before each layer and after the last."""
    shapes: list[Shape] = [IMAGE_SHAPE]
    for layer in layers(model):
        shapes.append(output_shape(layer, shapes[-1]))
    return shapes


def layers_and_inputs(model: ModelConfig) -> list[tuple[Layer, Shape]]:
    """Return each layer with the shape of one image it reads, input to logits."""
    return list(zip(layers(model), feature_shapes(model)[:-1], strict=True))


@dataclass(frozen=True)
class Weighted:
    """A layer with a kernel and a bias, in Keras's layout."""

    kernel_shape: Shape  # (height, width, in, out) for Conv, (in, out) for Dense
    flattened_from: Shape | None  # a Dense reading a flattened (h, w, c) feature map: that map


def weighted_layers(model: ModelConfig) -> list[Weighted]:
    """Return every Conv and Dense layer's kernel shape, input to logits."""
    weighted = []
    flattened: Shape | None = None  # the feature map the next Dense reads, flattened
    for layer, before in layers_and_inputs(model):
        if isinstance(layer, Conv):
            kernel = (layer.kernel_size, layer.kernel_size, before[-1], layer.filters)
            weighted.append(Weighted(kernel, None))
        elif isinstance(layer, Flatten) and len(before) == 3:
            flattened = before
        elif isinstance(layer, Dense):
            weighted.append(Weighted((before[0], layer.units), flattened))
            flattened = None
    return weighted


def expected_parameters(model: ModelConfig) -> int:
    """Return the number of trainable parameters of the network described by `model`."""
    return sum(prod(w.kernel_shape) + w.kernel_shape[-1] for w in weighted_layers(model))


def forward_flops(model: ModelConfig) -> int:
    """Return the floating-point operations of one image's forward pass through the convolutions
    and dense layers (a multiply-add is 2); a training step is about 3 times that per image."""
    flops = 0
    for (layer, before), after in zip(
        layers_and_inputs(model), feature_shapes(model)[1:], strict=True
    ):
        if isinstance(layer, Conv):
            flops += 2 * after[0] * after[1] * layer.filters * before[-1] * layer.kernel_size**2
        elif isinstance(layer, Dense):
            flops += 2 * before[0] * layer.units
    return flops


def shared_weights(model: ModelConfig, seed: int) -> Weights:
    """Return Glorot-uniform kernels (Keras's layout) with zero biases, drawn once with numpy."""
    rng = np.random.default_rng(seed)
    weights = []
    for layer in weighted_layers(model):
        receptive = prod(layer.kernel_shape[:-2])  # 1 for Dense; Keras's and PyTorch's fans
        fan_in, fan_out = (receptive * size for size in layer.kernel_shape[-2:])
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, size=layer.kernel_shape).astype(np.float32)
        weights.append((kernel, np.zeros(layer.kernel_shape[-1], dtype=np.float32)))
    return weights


def torch_layout(model: ModelConfig, weights: Weights) -> Weights:
    """Return Keras-layout weights in PyTorch's: Conv (h, w, in, out) -> (out, in, h, w); Dense
    (in, out) -> (out, in), its inputs reordered from (h, w, c) to (c, h, w) after a Flatten."""
    converted = []
    for layer, (kernel, bias) in zip(weighted_layers(model), weights, strict=True):
        if len(layer.kernel_shape) == 4:
            kernel = kernel.transpose(3, 2, 0, 1)
        else:
            if layer.flattened_from is not None:  # rows in (h, w, c) order -> (c, h, w) order
                units = kernel.shape[-1]
                kernel = kernel.reshape(*layer.flattened_from, units).transpose(2, 0, 1, 3)
                kernel = kernel.reshape(-1, units)
            kernel = kernel.T
        converted.append((np.ascontiguousarray(kernel), bias))
    return converted
