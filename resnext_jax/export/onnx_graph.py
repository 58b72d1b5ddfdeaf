"""An ONNX graph written straight from a model's fields and Flax variables, with the `onnx` helper API (no torch).

The graph follows the module's own structure, op by op (NCHW inside, NHWC at the edges, as the sidecar says):

- `Conv2d` + `BatchNorm` (`batch`, `frozen_batch`) at inference: one `Conv` (group = input channels / the
  kernel's input width), the norm folded into its weights and bias (in float64, then float32);
- `GroupNorm`: `Reshape` (N, G, -1), `InstanceNormalization`, `Reshape` back, `Mul` scale, `Add` bias;
- relu, silu, gelu: `Relu`; `Sigmoid` and `Mul`; the tanh form of `jax.nn.gelu(approximate=True)`;
- the stem's 3x3/2 max pool: `MaxPool` (its pads never win the max, like JAX's -inf);
- the ResNet-D shortcut's pool: `AveragePool` 2x2, `ceil_mode=1`, `count_include_pad=0`;
- squeeze-excitation: `GlobalAveragePool`, `Conv` `fc1` (bias), act, `Conv` `fc2`, `Sigmoid`, `Mul`;
- the residual add and the head: `Add`; `GlobalAveragePool`, `Flatten`, `Gemm` (none with `num_classes=0`).

Dropout and stochastic depth are identities at inference; `scan_blocks` variables are unstacked first. Custom
block classes, convs or norms are refused by name (export them with `--format stablehlo`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from resnext_jax.errors import UserError
from resnext_jax.models.layers import Conv2d
from resnext_jax.models.layout import unstack_blocks
from resnext_jax.models.norms import NORM_LAYERS
from resnext_jax.models.regnet import RegNet
from resnext_jax.models.resnet import BasicBlock, Bottleneck, ResNet

OPSET = 17
BN_EPSILON = 1e-5  # models.norms.BatchNorm's and GroupNorm's


class Graph:
    """ONNX nodes and initializers under construction; every tensor is named by the op that made it."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str) -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attributes) -> str:
        from onnx import helper

        output = output or self._name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


def supported_problems(module) -> list[str]:
    """What the writer cannot express for `module` ([] when it can): custom blocks, convs or norms."""
    problems = []
    if isinstance(module, ResNet):
        if module.block_cls not in (BasicBlock, Bottleneck):
            problems.append(f"block_cls={getattr(module.block_cls, '__name__', module.block_cls)}")
    elif not isinstance(module, RegNet):
        problems.append(f"a {type(module).__name__} module")
    conv = module.conv
    while isinstance(conv, functools.partial):
        if set(conv.keywords) - {"impl", "canonical_grad", "platform", "dtype"}:
            problems.append(f"conv with {sorted(conv.keywords)}")
        conv = conv.func
    if conv is not Conv2d:
        problems.append(f"conv={getattr(conv, '__name__', conv)}")
    if not isinstance(module.norm, str) or module.norm not in NORM_LAYERS:
        problems.append(f"norm={module.norm!r}")
    return problems


class _Writer:
    """Walks a ResNet or RegNet's variables in the order its `__call__` applies them."""

    def __init__(self, module, variables):
        self.module = module
        variables = unstack_blocks(variables)
        self.params = variables["params"]
        self.stats = variables.get("batch_stats", {})
        self.graph = Graph()
        self.channels = {}  # tensor name -> channels, for each conv's group count

    def act(self, x: str) -> str:
        g, kind = self.graph, self.module.activation
        if kind == "relu":
            return g.op("Relu", [x], "relu")
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], "sigmoid")], "silu")
        if kind == "gelu":  # jax.nn.gelu(approximate=True): x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))
            cube = g.op("Mul", [g.op("Mul", [x, x], "square"), x], "cube")
            inner = g.op("Add", [x, g.op("Mul", [cube, g.const(np.float32(0.044715), "c")], "mul")], "add")
            tanh = g.op("Tanh", [g.op("Mul", [inner, g.const(np.float32(math.sqrt(2 / math.pi)), "c")], "mul")], "t")
            half = g.op("Add", [tanh, g.const(np.float32(1), "one")], "add")
            cdf = g.op("Mul", [half, g.const(np.float32(0.5), "half")], "cdf")
            return g.op("Mul", [x, cdf], "gelu")
        raise UserError(f"activation={kind!r} has no ONNX form here; export with --format stablehlo")

    def conv(self, x: str, params: dict, in_channels: int, stride: int, norm=None) -> str:
        """`Conv` of `params` ('kernel' HWIO, optional 'bias'); `norm` = (scale, shift) per output channel, folded."""
        kernel = np.asarray(params["kernel"], np.float64)
        kh, kw, group_width, features = kernel.shape
        bias = np.asarray(params["bias"], np.float64) if "bias" in params else np.zeros(features)
        if norm is not None:
            scale, shift = norm
            kernel, bias = kernel * scale, bias * scale + shift
        weight = kernel.transpose(3, 2, 0, 1).astype(np.float32)  # HWIO -> OIHW
        pad_h, pad_w = (kh - 1) // 2, (kw - 1) // 2
        return self.graph.op(
            "Conv",
            [x, self.graph.const(weight, "weight"), self.graph.const(bias.astype(np.float32), "bias")],
            "conv",
            kernel_shape=[kh, kw],
            strides=[stride, stride],
            pads=[pad_h, pad_w, pad_h, pad_w],
            group=in_channels // group_width,
        )

    def unit(self, x: str, scope_params, scope_stats, conv: str, norm: str, stride=1, act=True, residual=None):
        """`act(norm(conv(x)) + residual)`, as `ConvNormAct` computes it at inference; returns the output tensor."""
        g, params = self.graph, scope_params[conv]
        in_channels = self.channels[x]
        features = params["kernel"].shape[-1]
        if self.module.norm == "group":
            y = self.group_norm(self.conv(x, params, in_channels, stride), scope_params[norm]["gn"], features)
        else:
            scale = np.asarray(scope_params[norm]["scale"], np.float64)
            mean = np.asarray(scope_stats[norm]["mean"], np.float64)
            var = np.asarray(scope_stats[norm]["var"], np.float64)
            multiplier = scale / np.sqrt(var + BN_EPSILON)
            shift = np.asarray(scope_params[norm]["bias"], np.float64) - mean * multiplier
            y = self.conv(x, params, in_channels, stride, (multiplier, shift))
        self.channels[y] = features
        if residual is not None:
            y = g.op("Add", [y, residual], "add")
            self.channels[y] = features
        if act:
            y = self.act(y)
            self.channels[y] = features
        return y

    def group_norm(self, x: str, params: dict, channels: int) -> str:
        """flax's GroupNorm with models.norms.GroupNorm's group fallback, as InstanceNormalization over groups."""
        g = self.graph
        groups = next(k for k in range(min(self.module.norm_groups, channels), 0, -1) if channels % k == 0)
        grouped = g.op("Reshape", [x, g.const(np.array([0, groups, -1], np.int64), "shape")], "grouped")
        ones, zeros = np.ones(groups, np.float32), np.zeros(groups, np.float32)
        normal = g.op(
            "InstanceNormalization",
            [grouped, g.const(ones, "ones"), g.const(zeros, "zeros")],
            "gn",
            epsilon=BN_EPSILON,
        )
        y = g.op("Reshape", [normal, g.op("Shape", [x], "shape")], "ungrouped")
        scale = np.asarray(params["scale"], np.float32).reshape(-1, 1, 1)
        bias = np.asarray(params["bias"], np.float32).reshape(-1, 1, 1)
        return g.op("Add", [g.op("Mul", [y, g.const(scale, "gn_scale")], "mul"), g.const(bias, "gn_bias")], "gn_out")

    def squeeze_excite(self, x: str, params: dict) -> str:
        g = self.graph
        pooled = g.op("GlobalAveragePool", [x], "se_pool")
        hidden = self.act(self.conv(pooled, params["fc1"], params["fc1"]["kernel"].shape[2], 1))
        gate = g.op("Sigmoid", [self.conv(hidden, params["fc2"], params["fc2"]["kernel"].shape[2], 1)], "se_gate")
        return g.op("Mul", [x, gate], "se")

    def shortcut(self, x: str, params: dict, stats: dict, names: tuple[str, str], stride: int) -> str:
        """`x`, or the projection where the block has one (after a 2x2 average pool with `avg_down`)."""
        if names[0] not in params:
            return x
        if getattr(self.module, "avg_down", False) and stride > 1:
            pooled = self.graph.op(
                "AveragePool", [x], "avg_down", kernel_shape=[2, 2], strides=[stride, stride], ceil_mode=1
            )  # count_include_pad defaults to 0: the edge windows average what they cover
            self.channels[pooled] = self.channels[x]
            x, stride = pooled, 1
        return self.unit(x, params, stats, *names, stride=stride, act=False)

    def resnet_block(self, x: str, name: str, stride: int) -> str:
        params, stats = self.params[name], self.stats.get(name, {})
        if self.module.block_cls is BasicBlock:
            y, last = self.unit(x, params, stats, "conv1", "bn1", stride), "2"
        else:
            y = self.unit(x, params, stats, "conv1", "bn1")
            y, last = self.unit(y, params, stats, "conv2", "bn2", stride), "3"
        residual = self.shortcut(x, params, stats, ("downsample_conv", "downsample_bn"), stride)
        if "se" not in params:
            return self.unit(y, params, stats, f"conv{last}", f"bn{last}", residual=residual)
        y = self.unit(y, params, stats, f"conv{last}", f"bn{last}", act=False)
        y = self.squeeze_excite(y, params["se"])
        return self.add_act(y, residual)

    def regnet_block(self, x: str, name: str, stride: int) -> str:
        params, stats = self.params[name], self.stats.get(name, {})
        y = self.unit(x, params, stats, "a_conv", "a_bn")
        y = self.unit(y, params, stats, "b_conv", "b_bn", stride)
        if "se" in params:
            channels = self.channels[y]
            y = self.squeeze_excite(y, params["se"])
            self.channels[y] = channels
        residual = self.shortcut(x, params, stats, ("proj_conv", "proj_bn"), stride)
        return self.unit(y, params, stats, "c_conv", "c_bn", residual=residual)

    def add_act(self, y: str, residual: str) -> str:
        channels = self.channels[residual]
        y = self.act(self.graph.op("Add", [residual, y], "add"))
        self.channels[y] = channels
        return y

    def max_pool(self, x: str) -> str:
        y = self.graph.op("MaxPool", [x], "max_pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        self.channels[y] = self.channels[x]
        return y

    def body(self, x: str) -> str:
        """The stem and the stages: NCHW features of the last stage."""
        m, p, s = self.module, self.params, self.stats
        if isinstance(m, RegNet):
            x = self.unit(x, p, s, "stem_conv", "stem_bn", 1 if m.small_stem else 2)
            for stage, blocks in enumerate(m.widths()[1]):
                for index in range(blocks):
                    x = self.regnet_block(x, f"block{stage + 1}_{index}", 2 if index == 0 else 1)
            return x
        if m.small_stem:
            x = self.unit(x, p, s, "conv1", "bn1")
        elif m.stem_type:
            x = self.unit(x, p, s, "conv1_0", "conv1_1", 2)
            x = self.unit(x, p, s, "conv1_3", "conv1_4")
            x = self.max_pool(self.unit(x, p, s, "conv1_6", "bn1"))
        else:
            x = self.max_pool(self.unit(x, p, s, "conv1", "bn1", 2))
        for stage, blocks in enumerate(m.stage_sizes):
            for index in range(blocks):
                x = self.resnet_block(x, f"layer{stage + 1}_{index}", 2 if stage > 0 and index == 0 else 1)
        return x


def build(module, variables, *, batch: int | None, resolution: int, normalization=None):
    """The `onnx.ModelProto` of `module` (eval mode) with `variables`: input `images` (B, R, R, 3) NHWC float32,
    or uint8 with `normalization` = (255 mean, 1 / (255 std)) applied inside; output `logits` (B, classes)."""
    from onnx import TensorProto, checker, helper

    problems = supported_problems(module)
    if problems:
        raise UserError(
            f"the ONNX writer knows the registry's ResNet and RegNet blocks, convs and norms, not "
            f"{', '.join(problems)}; export this model with --format stablehlo"
        )
    writer = _Writer(module, variables)
    g = writer.graph
    x = "images"
    if normalization is not None:
        mean, inv_std = normalization
        x = g.op("Cast", [x], "float", to=TensorProto.FLOAT)
        x = g.op("Mul", [g.op("Sub", [x, g.const(mean, "mean")], "centred"), g.const(inv_std, "inv_std")], "scaled")
    x = g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    writer.channels[x] = 3
    body = writer.body(x)
    features = module.num_classes or writer.channels[body]
    x = g.op("GlobalAveragePool", [body], "pool")
    if module.num_classes:
        x = g.op("Flatten", [x], "pre_logits", axis=1)
        head = writer.params["fc"]
        g.op(
            "Gemm",
            [
                x,
                g.const(np.asarray(head["kernel"], np.float32), "fc_kernel"),
                g.const(np.asarray(head["bias"], np.float32), "fc_bias"),
            ],
            "fc",
            output="logits",
        )
    else:
        g.op("Flatten", [x], "pre_logits", output="logits", axis=1)
    batch_dim = batch or "batch"
    inputs = [
        helper.make_tensor_value_info(
            "images",
            TensorProto.UINT8 if normalization is not None else TensorProto.FLOAT,
            [batch_dim, resolution, resolution, 3],
        )
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, features])]
    graph = helper.make_graph(g.nodes, "resnext_jax", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="resnext_jax.export")
    model.ir_version = 8  # opset 17's; onnxruntime, TensorRT and OpenVINO all read it
    checker.check_model(model)
    return model
