"""kvtune: layer-wise mixed-precision KV cache quantization."""
