"""`python -m sid.rl`: GRPO after SFT (MiniOneRec's RL stage), then the HF export and the test eval.

The SFT model (`rl.init`) -> the train prompts with their target SIDs -> each step, a rollout of the live policy
(`sid.rl.source`) -> one jitted GRPO update (`sid.rl.loss.make_loss_fn` through the shared trainer, with the SFT
stage's valid ranking, best-checkpoint selection, checkpoints and exact resume) -> RUN_DIR/model and the test eval.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path

from sid.compat.hf import hf_model_dir, load_qwen2
from sid.config import ConfigError
from sid.data.dataset import dataset_dir, load_tokenizer, load_train_split
from sid.data.tokenizer import SIDTokenizer
from sid.eval.held_out import sft_evaluators
from sid.eval.runner import catalog_trie, smallest_bucket
from sid.jobs import RLJob
from sid.loss import sft_loss
from sid.models.build import token_extension
from sid.models.flops import num_params, train_flops
from sid.models.qwen2 import Qwen2, pad_vocab, unpad_vocab
from sid.parallel.mesh import data_parallel_size
from sid.rl.loss import make_loss_fn, rl_step_stats
from sid.rl.prompts import rl_prompts
from sid.rl.rewards import REWARDS
from sid.rl.rollout import row_width
from sid.rl.source import RolloutSource
from sid.stage import hand_on, stage_main, start_run
from sid.trainer import fit, make_optimizer

log = logging.getLogger("sid")


def init_model_dir(init: str) -> Path:
    """The HF directory `rl.init` names: an SFT run's `model/` export, or the directory itself."""
    if not init:
        raise ConfigError("rl.init is empty: give an SFT run directory or an HF model directory")
    path = Path(init)
    if directory := hf_model_dir(path):
        return directory
    raise ConfigError(
        f"rl.init={init}: no model there (neither an SFT run's export {path / 'model'}/config.json nor an HF "
        f"directory's {path}/config.json; a preempted SFT run exports nothing until it finishes)"
    )


def load_policy(job: RLJob, directory: Path, tok: SIDTokenizer, sid_tokens: list[str]) -> Qwen2:
    """The starting policy from `directory`, refused when the catalog's SID tokens have no row in its vocab (a
    model fine-tuned on another catalog or tokenizer); the vocab padded to model.vocab_multiple."""
    model, _ = load_qwen2(directory, dataclasses.replace(job.model, hf_path=str(directory)))
    missing = [t for t in sid_tokens if tok.token_id(t) >= model.valid_vocab]
    if missing:
        raise ConfigError(
            f"{directory}: {len(missing)} of the catalog's {len(sid_tokens)} SID tokens (e.g. {missing[0]}, id "
            f"{tok.token_id(missing[0])}) are beyond the checkpoint's {model.valid_vocab}-token vocab: was it "
            "fine-tuned on this catalog and tokenizer?"
        )
    log.info("policy from %s: %.1fM params, vocab %d", directory, num_params(model) / 1e6, model.valid_vocab)
    return pad_vocab(unpad_vocab(model), job.model.vocab_multiple)


def check_rl(job: RLJob, mesh, num_leaves: int) -> None:
    """Refuse, before anything runs, settings no rollout or step could honour."""
    rl, dp, accum = job.rl, data_parallel_size(mesh), job.train.grad_accum_steps
    if rl.reward not in REWARDS:
        raise ConfigError(f"rl.reward={rl.reward!r} is not one of {sorted(REWARDS)}")
    if not 2 <= rl.group_size <= num_leaves:
        raise ConfigError(f"rl.group_size={rl.group_size} must be in [2, {num_leaves}] (the catalog's SIDs)")
    if rl.prompts_per_step < 1 or rl.prompts_per_step % (dp * accum):
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} must be a positive multiple of the {dp} data "
                          f"shards of the mesh x train.grad_accum_steps={accum} (so that each shard's micro-batch "
                          "holds as many prompts)")  # fmt: skip
    if rl.rollout_chunks < 1 or rl.prompts_per_step % (dp * rl.rollout_chunks):
        raise ConfigError(f"rl.rollout_chunks={rl.rollout_chunks} must be >= 1 and split rl.prompts_per_step="
                          f"{rl.prompts_per_step} into chunks that divide over the {dp} data shards")  # fmt: skip
    if not rl.temperature > 0 or rl.beta < 0 or rl.ref_sync_every < 0 or rl.title_history_samples < 0:
        raise ConfigError(f"rl.temperature={rl.temperature} must be > 0, rl.beta={rl.beta}, rl.ref_sync_every="
                          f"{rl.ref_sync_every}, rl.title_history_samples={rl.title_history_samples} >= 0")  # fmt: skip
    if not 0 < rl.ref_sync_alpha <= 1:
        raise ConfigError(f"rl.ref_sync_alpha={rl.ref_sync_alpha} must be in (0, 1]")
    if rl.dynamic_sampling and rl.rollout != "sample":
        raise ConfigError("rl.dynamic_sampling draws extra samples: it needs rl.rollout=sample")


def prompt_length(prompts: list[list[int]], buckets: tuple[int, ...]) -> int:
    """The smallest of eval.prompt_buckets that holds every prompt (longer ones keep their last tokens)."""
    longest = max(len(p) for p in prompts)
    length = smallest_bucket(longest, buckets)
    if longest > length:
        log.warning("rl: prompts up to %d tokens keep their last %d (eval.prompt_buckets)", longest, length)
    return length


def run_rl(job: RLJob) -> dict:
    """GRPO from `rl.init` (then the export and the test eval); returns run_summary.json's content."""
    directory = init_model_dir(job.rl.init)
    run, tracker, mesh = start_run(job)
    rows_data, catalog, bad_rows = load_train_split(job.data, run.path)
    tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job.data, run.path), job.data.data_root)
    model = load_policy(job, directory, tok, catalog.sid_tokens())
    trie = catalog_trie(tok, catalog)
    check_rl(job, mesh, trie.num_leaves)
    sets = rl_prompts(rows_data, catalog, job.tasks, job.rl, job.data.category_text, job.train.seed)
    pairs = [pair for prompts in sets.values() for pair in prompts]
    prompts = tok.encode_batch([p for p, _ in pairs])
    length = prompt_length(prompts, job.eval.prompt_buckets)
    source = RolloutSource(trie, prompts, [t for _, t in pairs], model, job.rl, mesh, prompt_length=length,
                           pad_id=tok.pad_id, seed=job.train.seed, run_dir=run.path,
                           micro_batches=job.train.grad_accum_steps, buckets=job.eval.prompt_buckets)  # fmt: skip
    steps = job.train.max_steps or math.ceil(job.train.epochs * len(pairs) / job.rl.prompts_per_step)
    log.info("rl: %d prompts (%s), %d per step x %d completions, %d steps", len(pairs),
             ", ".join(f"{name} {len(p)}" for name, p in sets.items()), job.rl.prompts_per_step, job.rl.group_size,
             steps)  # fmt: skip
    run.update(
        data={"train_rows": len(rows_data), "bad_rows": bad_rows.as_dict()},
        token_extension=token_extension(tok),
        rl={"prompts": {name: len(p) for name, p in sets.items()}},
    )
    optimizer, lr = make_optimizer(job.optimizer, job.train, steps, model)
    width = row_width(length, job.rl.group_size, trie.tables.num_steps)
    try:
        model, train = fit(
            model=model, loss_fn=make_loss_fn(beta=job.rl.beta, kind=job.rl.loss), optimizer=optimizer,
            lr_schedule=lr, batches=source, total_steps=steps, cfg=job.train, mesh=mesh, run=run, tracker=tracker,
            flops=train_flops(model, width), step_stats=rl_step_stats,
            bar_stats=("rollout/reward_mean", "kl"),
            evaluators=sft_evaluators(job, tok, mesh, run.path, sft_loss),
        )  # fmt: skip
    finally:
        source.close()
    run.update(train={**train, "completions_per_step": job.rl.prompts_per_step * job.rl.group_size,
                      "init": str(directory)})  # fmt: skip
    hand_on(job, model, train, tok, mesh, run, tracker)
    return run.summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(RLJob, run_rl, argv)


if __name__ == "__main__":
    sys.exit(main())
