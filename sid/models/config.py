"""ModelConfig: which Qwen2 architecture to build, where its weights come from, and its numerics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """The decoder LLM (Qwen2 family). Architecture fields apply when training from scratch; when `hf_path` is
    set they are read from that checkpoint's config.json instead."""

    hf_path: str | None = None
    """Local HF directory (config.json + safetensors), or a hub id resolved when online. None: from scratch."""
    vocab_size: int = 0
    """Embedding rows when from scratch; 0 means the tokenizer's size (with SID tokens), padded."""
    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 172
    """SwiGLU MLP width."""
    num_layers: int = 2
    """Decoder layers (stacked and scanned)."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_heads."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency (HF configs without the key get 1e6)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head, exactly as the HF config says when loading."""
    max_position_embeddings: int = 32768
    """Longest position the model is built for."""
    init_std: float = 0.02
    """Std of the normal init for from-scratch weights."""
    remat: Literal["none", "full", "dots"] = "full"
    """Rematerialisation of each scanned layer: none, full, or save only matmul and cuDNN attention outputs ('dots')."""
    scan_unroll: int = 1
    """Layers per iteration of the layer scan: 1 keeps compile time flat in depth; num_layers unrolls fully, which
    on a GPU makes a training step faster and its compile slower (docs/benchmarks.md, "Unrolling the layer scan")."""
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Activation/matmul dtype; params stay float32, softmax, norms and logits are float32."""
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    """`jax.nn.dot_product_attention` implementation: auto = cuDNN fused attention on a GPU with bf16 compute
    where cuDNN accepts the shapes, XLA otherwise; xla; or cudnn (GPU only)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities while training (when the model gets a PRNG key); 0 is off. Above 0,
    training attention runs an explicit softmax in XLA (cuDNN's and XLA's `dot_product_attention` cannot drop
    probabilities), which keeps the [heads, seq, seq] probabilities and is slower; eval and generation are
    unaffected."""
    residual_dropout: float = 0.0
    """Dropout on the attention and MLP outputs before each residual add, while training; 0 is off."""
    new_token_init: Literal["mean", "normal"] = "mean"
    """How embedding rows added for SID tokens are initialised: the mean of the existing rows, or N(0, init_std)."""
    vocab_multiple: int = 128
    """Pad the vocab (embedding and head rows) to a multiple of this; padded logits are masked to -inf."""
    seed: int = 0
    """Seed for from-scratch and new-row initialisation."""


@dataclass(frozen=True)
class GPTConfig:
    """Karpathy's nanoGPT: learned positions, pre-LN LayerNorm, 4x GELU MLP, tied head, dropout."""

    block_size: int = 256
    """Context length (learned position embeddings)."""
    vocab_size: int = 0
    """Vocabulary; 0 means the character codec's size."""
    n_layer: int = 6
    """Transformer blocks."""
    n_head: int = 6
    """Attention heads."""
    n_embd: int = 384
    """Model width."""
    dropout: float = 0.2
    """Dropout on attention weights, residual branches and embeddings (training only)."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers."""
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Activation/matmul dtype; params float32, softmax, norms and loss float32."""
    remat: Literal["none", "full", "dots"] = "none"
    """Rematerialisation of each scanned block."""
    scan_unroll: int = 1
    """Blocks per iteration of the block scan: 1 keeps compile time flat in depth; n_layer unrolls fully (faster
    for small models)."""
    seed: int = 0
    """Init seed."""
