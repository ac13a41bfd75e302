"""Explainable models that run outside TensorFlow: LiteRT (TFLite builtins) and ONNX Runtime.

`gradients` holds the backward pass built from forward ops only; `export` checks a portable
SavedModel's ops and writes and checks the .tflite and .onnx files.
"""
