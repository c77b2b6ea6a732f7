"""Top-level job configs, one per entry point: each is a preset file's schema and the CLI's flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from sid.config import MeshConfig, SampleConfig, TrainConfig, WandbConfig
from sid.data.config import CharDataConfig, DataConfig, TasksConfig, TokenizerConfig
from sid.eval.config import EvalConfig
from sid.index.config import EmbedConfig, OutputConfig, QuantizerConfig
from sid.models.config import GPTConfig, ModelConfig
from sid.optim.config import OptimizerConfig
from sid.rl.config import RLConfig


@dataclass(frozen=True)
class TrainJob:
    """Fine-tune a Qwen2 model to generate the next item's semantic ID, then (optionally) evaluate it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class RLJob:
    """Improve an SFT model's next-SID ranking with GRPO on its own trie-constrained rollouts, then evaluate it."""

    rl: RLConfig = field(default_factory=RLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/rl"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class EvalJob:
    """Rank a split with trie-constrained beam search and report HR@K / NDCG@K."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output_dir: str = "runs/eval"
    """Run directory for predictions, the log and run_summary.json."""


@dataclass(frozen=True)
class NanoGPTJob:
    """Train Karpathy's nanoGPT on character-level text with the shared trainer (the regression workload)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: CharDataConfig = field(default_factory=CharDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/nanogpt"))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass(frozen=True)
class IndexJob:
    """Build semantic IDs: embed the items, quantize the embeddings residually, make the SIDs unique, write them
    in MiniOneRec's format."""

    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
