"""Executors of an IntegerModel. `reference` is the exact-integer ground truth and `simulate` its float64
oracle; `c_export` writes the same integers as portable C99 (`c_runner` builds and runs it);
`torch_quantized` runs them on PyTorch's quantized kernels and `onnx_export` / `onnx_runtime` in ONNX
Runtime (QLinear ops, or exact integer subgraphs). `registry` puts them behind one protocol and
`verify` checks each against the reference."""
