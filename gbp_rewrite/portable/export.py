"""Portable exports: check that a SavedModel's signature uses only ops TFLite builtins and ONNX both
run, write the .tflite and .onnx files, and run each in its own runtime on the probe batch."""

from __future__ import annotations

# Op types (forward and backward) that both TFLite's builtins and ONNX (through tf2onnx) convert,
# plus the graph plumbing every converter removes (calls are inlined, variables frozen).
ALLOWED_OP_TYPES = frozenset({
    # plumbing
    "Const", "Identity", "IdentityN", "Placeholder", "NoOp", "ReadVariableOp", "VarHandleOp",
    "PartitionedCall", "StatefulPartitionedCall", "StopGradient", "Snapshot",
    # neural network
    "Conv2D", "Conv2DBackpropInput", "DepthwiseConv2dNative", "MaxPool", "AvgPool", "MatMul",
    "BatchMatMulV2", "BiasAdd", "Relu", "Relu6", "Softmax", "Sigmoid", "Tanh", "DepthToSpace",
    "SpaceToDepth", "LeakyRelu", "SpaceToBatchND", "BatchToSpaceND",
    # arithmetic and comparison
    "AddV2", "Add", "AddN", "Sub", "Mul", "RealDiv", "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Exp", "Log",
    "Maximum", "Minimum", "Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual",
    "LogicalAnd", "LogicalOr", "LogicalNot", "Select", "SelectV2", "Cast", "Floor",
    # reductions and indexing
    "Mean", "Sum", "Max", "Min", "Prod", "ArgMax", "OneHot", "GatherV2",
    # shapes
    "Reshape", "Shape", "Squeeze", "ExpandDims", "ConcatV2", "Pack", "Unpack", "Split", "SplitV",
    "StridedSlice", "Slice", "Pad", "PadV2", "Transpose", "ReverseV2", "Fill", "ZerosLike",
    "OnesLike", "Tile", "BroadcastTo", "Range",
})
