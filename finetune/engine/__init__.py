"""The serving engine: continuous batching (scheduler), what a request carries (requests), the forward pass
with its KV cache (decoder), weight-only quantization and our int8 kernel (quant, kernel, kernels/),
and the fast decode steps (cpu_step ahead of time on a CPU, cuda_graphs on a GPU, one load_step in
fast_paths)."""
