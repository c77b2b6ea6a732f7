"""TrainConfig: batch sizes, length of training, learning-rate schedule, logging and checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    """The training run. Effective batch = per_device_batch_size × devices × grad_accum_steps rows."""

    output_dir: str = "runs/sft"
    """Run directory: config_resolved.yaml, train.log, run_summary.json, checkpoints/."""
    seed: int = 0
    """Seed for data order, dropout and from-scratch init."""
    per_device_batch_size: int = 8
    """Rows per device per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated (in f32, inside one jitted step) per optimizer step."""
    gather_params_once: bool = False
    """Under fsdp: gather the f32 params once per step and let each device accumulate its own rows' whole gradient,
    reduced over fsdp once per step, instead of gathering weights for every micro-batch's forward and backward and
    reduce-scattering every micro-batch's gradients. Cuts fsdp traffic about grad_accum_steps-fold (the seed step,
    1.5B on fsdp8 with 8 micro-batches: 107 GB per device per step to 12.4); costs every device a whole f32 copy of
    the params, a whole f32 gradient accumulator and one micro-batch's whole gradients (12 bytes per param beyond
    FSDP's shards: 18.5 GB at 1.5B), so it suits models that fit that way. Same step up to float order."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 means from epochs."""
    learning_rate: float = 3e-4
    """Peak learning rate (Muon's under the Muon optimizers)."""
    aux_learning_rate: float = 3e-4
    """Peak learning rate of the AdamW branch under Muon (embeddings, head, norms, biases)."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps; the first update's learning rate is peak/(warmup+1), never 0."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    log_every: int = 10
    """Steps between log lines / W&B points."""
    eval_loss_every: int = 0
    """Steps between held-out loss estimates (0: never)."""
    eval_loss_batches: int = 20
    """Batches per held-out loss estimate."""
    valid_rank_every: int = 0
    """Steps between ranking a fixed valid subset with the constrained beam search (HR/NDCG@K; 0: never). Both
    held-out evaluations also run after the last step."""
    valid_rank_samples: int = 1000
    """Valid prompts ranked each time: a fixed, seeded subset (0: the whole valid split)."""
    select_by: Literal["none", "ndcg@10", "hr@10", "loss"] = "none"
    """Keep the best checkpoint by valid NDCG@10 / HR@10 (needs valid_rank_every) or held-out loss (needs
    eval_loss_every), apart from the rolling ones, in output_dir/best."""
    early_stop_patience: int = 0
    """Stop after this many evaluations of select_by in a row without a new best (0: never)."""
    final_model: Literal["best", "last"] = "best"
    """Which model the test eval and the HF export use when select_by picks one."""
    label_smoothing: float = 0.0
    """SFT loss: weight of the uniform distribution over the real vocabulary mixed into each target."""
    save_every: int = 0
    """Steps between checkpoints (0: only the last)."""
    save_last: bool = True
    """Checkpoint at the end of training."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir/checkpoints."""
    progress_bar: bool = True
    """Show a tqdm progress bar (loss, lr, tokens/s, MFU, ETA)."""
