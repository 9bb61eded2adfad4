"""The serving engine: continuous batching (scheduler) over the running batch's KV cache (batch) and
cached prompt prefixes (prefix_cache), what a request carries (requests), the forward pass with its KV
cache (decoder), weight-only quantization and our int8 kernel (quant, kernel, kernels/), and the fast
decode steps (on a CPU ahead of time: the layer's math in cpu_layer, run by cpu_step, built, cached and
loaded by cpu_compile; cuda_graphs on a GPU; one load_step in fast_paths)."""
