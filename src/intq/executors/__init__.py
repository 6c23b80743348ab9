"""Executors of an IntegerModel. `reference` is the exact-integer ground truth; `c_export` writes the
same integers as portable C99; `torch_quantized` runs them on PyTorch's quantized kernels and
`onnx_export` in ONNX Runtime (QLinear ops, or exact integer subgraphs). `intq verify` checks each
against the reference."""
