"""ONNX export of the deepport graph (deepport-domain functions, one per op contract) and the onnxruntime
cross-check of cpu_ref. Needs the `onnx` and `onnxruntime` packages (extra `onnx`)."""
