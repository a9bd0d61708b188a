"""Built-in backends: cpu_ref (the spec), cuda, rocm (Triton) and ascend (torch_npu)."""
