"""The tiny Qwen2 the model tests start from (one place): each test names only what it changes."""

from sid.models.config import ModelConfig

TINY_QWEN2 = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    compute_dtype="float32", remat="none",
)  # fmt: skip
"""2 layers, 4 query heads over 2 KV heads, 32 wide; f32 compute (oracles compare in f32) and no remat."""


def tiny_qwen2(**changes) -> ModelConfig:
    """`TINY_QWEN2` with `changes` (any ModelConfig field)."""
    return ModelConfig(**(TINY_QWEN2 | changes))
