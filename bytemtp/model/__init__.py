"""The network: its config and presets, the trunk and heads, the KV cache, and the CPU
few-row matmul layer that decoding uses."""
