"""ONNX models written node by node the way other exporters write them, to reproduce
their quirks: tf2onnx's Keras models (an NHWC input and a Transpose, 'same' padding
that is asymmetric at stride 2, unfolded BatchNormalization, weight names full of '/'
and ':', a Softmax head, a dynamic batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Graph:
    """Collects nodes and initializers; names in tf2onnx's style."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def weight(self, name: str, shape, scale: float = 0.2, positive: bool = False):
        data = self.rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            data = np.abs(data) + 0.5
        self.inits.append(numpy_helper.from_array(data, name))
        return name

    def node(self, op: str, inputs, name: str, **attrs) -> str:
        out = f"{name}:0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, x, scope: str, cin: int, cout: int, k: int, stride: int, pads,
             group: int = 1) -> str:
        w = self.weight(f"{scope}/Conv2D/ReadVariableOp:0", (cout, cin // group, k, k),
                        scale=(2.0 / (cin // group * k * k)) ** 0.5)
        return self.node("Conv", [x, w], f"{scope}/Conv2D", kernel_shape=[k, k],
                         strides=[stride, stride], pads=list(pads), group=group)

    def batch_norm(self, x, scope: str, c: int) -> str:
        base = f"{scope}/FusedBatchNormV3"
        inputs = [x, self.weight(f"{base}/ReadVariableOp:0", (c,), positive=True),
                  self.weight(f"{base}/ReadVariableOp_1:0", (c,)),
                  self.weight(f"{base}/ReadVariableOp_2:0", (c,), scale=0.1),
                  self.weight(f"{base}/ReadVariableOp_3:0", (c,), positive=True)]
        return self.node("BatchNormalization", inputs, base, epsilon=1e-3)

    def relu(self, x, scope: str) -> str:
        return self.node("Relu", [x], f"{scope}/Relu")


# TensorFlow's 'same' padding: (top, left, bottom, right) -> ONNX [t, l, b, r]. At stride 2
# on an even size the extra row and column go to the bottom and right.
SAME_S1 = (1, 1, 1, 1)
SAME_S2 = (0, 0, 1, 1)


def keras_like(path: Path, size: int = 32, batch: int | str = 1, classes: int = 10,
               seed: int = 0) -> Path:
    """A small Keras-Xception-like CNN as tf2onnx writes it; ``batch`` a number, or a
    name for a dynamic batch dimension."""
    g = _Graph(seed)
    x = g.node("Transpose", ["input_1:0"], "xception/input_transpose", perm=[0, 3, 1, 2])
    x = g.relu(g.batch_norm(g.conv(x, "xception/block1_conv1", 3, 24, 3, 2, SAME_S2),
                            "xception/block1_conv1_bn", 24), "xception/block1_conv1_act")
    block_in = x
    # A separable conv, then a strided one (asymmetric 'same'), and the strided 1x1
    # residual branch, as Keras' Xception entry flow has them.
    x = g.conv(x, "xception/block2_sepconv1/separable_conv2d/depthwise", 24, 24, 3, 1,
               SAME_S1, group=24)
    x = g.conv(x, "xception/block2_sepconv1/separable_conv2d", 24, 40, 1, 1, (0, 0, 0, 0))
    x = g.relu(g.batch_norm(x, "xception/block2_sepconv1_bn", 40), "xception/block2_act")
    x = g.conv(x, "xception/block2_sepconv2/separable_conv2d/depthwise", 40, 40, 3, 2,
               SAME_S2, group=40)
    x = g.conv(x, "xception/block2_sepconv2/separable_conv2d", 40, 40, 1, 1, (0, 0, 0, 0))
    x = g.batch_norm(x, "xception/block2_sepconv2_bn", 40)
    skip = g.batch_norm(g.conv(block_in, "xception/conv2d", 24, 40, 1, 2, (0, 0, 0, 0)),
                        "xception/batch_normalization", 40)
    x = g.relu(g.node("Add", [x, skip], "xception/add/add"), "xception/block3_act")
    x = g.node("GlobalAveragePool", [x], "xception/avg_pool/Mean")
    x = g.node("Flatten", [x], "xception/avg_pool/Mean_Squeeze", axis=1)
    w = g.weight("xception/predictions/MatMul/ReadVariableOp:0", (40, classes))
    b = g.weight("xception/predictions/BiasAdd/ReadVariableOp:0", (classes,))
    x = g.node("MatMul", [x, w], "xception/predictions/MatMul")
    x = g.node("Add", [x, b], "xception/predictions/BiasAdd")
    g.nodes.append(helper.make_node("Softmax", [x], ["predictions"], axis=-1,
                                    name="xception/predictions/Softmax"))
    inp = helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, size, size, 3])
    out = helper.make_tensor_value_info("predictions", TensorProto.FLOAT, [batch, classes])
    graph = helper.make_graph(g.nodes, "tf2onnx", [inp], [out], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)],
                              producer_name="tf2onnx", producer_version="1.16.1")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
