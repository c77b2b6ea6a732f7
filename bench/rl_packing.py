"""What packing RL groups into rows saves (`rl.pack`): the reference pass and the update's forward and backward
over a step's groups, one prompt per row against packed rows, on the same prompts and completions.

Prompt lengths are those of the MiniOneRec Industrial RL preset (configs/rl/industrial.yaml: next_sid, title2sid,
description2sid and title_history prompts, tokenized as `python -m sid.rl` does and cut to their last 512 tokens),
--prompts of them drawn at random per step; token ids and completions are random (the time does not depend on
them). Rows are as wide as the longest prompt (512) and its group's completions, as in the stage.

The model is a Qwen2 with a small vocab (--vocab): under Qwen's 151k vocab a CPU-sized trunk spends its step in the
LM head, which packing does not shrink, while at 1.5B the trunk dominates (its matmul parameters are about 5.6x the
head's; the default 4 layers x 256 with 2,048 tokens, about 7.5x). On a GPU, --arch 1.5b --dtype bfloat16 --remat
dots measures the real architecture under its own vocab. Per step and layout: the reference model's
`completion_logprobs`, then `jax.value_and_grad` of `make_loss_fn`'s loss, both jitted, called once to compile
(every row count is a shape) and then timed. Both layouts must give the same reference log-probs (checked).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    arch_config,
    arch_vocab,
    host_environment,
    jax_environment,
    markdown_table,
    preset_rl_prompts,
    write_json,
)

PROMPT_LENGTH = 512
"""The preset's prompt bucket (TRL's max_prompt_length): longer prompts keep their last 512 tokens."""


def build_model(args: argparse.Namespace):
    """--arch's Qwen2 under its vocab (`bench.common.ARCHS`), else the --layers x --hidden trunk under --vocab."""
    import jax

    from sid.models.config import ModelConfig
    from sid.models.qwen2 import Qwen2

    numerics = dict(compute_dtype=args.dtype, remat=args.remat)
    if args.arch:
        cfg = arch_config(args.arch, vocab_size=args.vocab, **numerics)
    else:
        width = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_heads=4, num_kv_heads=2)
        cfg = ModelConfig(vocab_size=args.vocab, num_layers=args.layers, **width, **numerics)
    return Qwen2.init(cfg, key=jax.random.key(args.seed))


def step_batches(args: argparse.Namespace, lengths: np.ndarray, trie) -> list[dict[str, Any]]:
    """Per step: random prompts of the preset's lengths (left-padded), random completions, and advantages."""
    from sid.rl.source import left_pad

    rng = np.random.default_rng(args.seed)
    steps = []
    for _ in range(args.steps):
        prompts = [rng.integers(0, args.vocab, n).tolist() for n in rng.choice(lengths, args.prompts)]
        ids, mask = left_pad(prompts, PROMPT_LENGTH, 0)
        leaves = rng.integers(0, trie.num_leaves, (args.prompts, args.group))
        advantages = rng.normal(size=(args.prompts, args.group)).astype(np.float32)
        steps.append({"ids": ids, "mask": mask, "leaves": leaves, "advantages": advantages})
    return steps


def measure(args: argparse.Namespace, model, trie, steps: list[dict[str, Any]], pack: bool) -> dict[str, Any]:
    """Seconds of the reference pass and the update per step in one layout, its rows, and the reference log-probs
    of every step, [P, G, T] in prompt order."""
    import equinox as eqx
    import jax

    from sid.rl.loss import completion_logprobs, make_loss_fn
    from sid.rl.rollout import group_rows

    loss_fn = make_loss_fn(beta=1e-3)
    update = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, b: loss_fn(m, b, None)[0]))
    reference = eqx.filter_jit(completion_logprobs)
    seconds, rows, logprobs = [], [], []
    for step in steps:
        batch, plan = group_rows(trie, step["ids"], step["mask"], step["leaves"], pack=pack)
        batch = {k: v % args.vocab if k in ("input_ids", "completions") else v for k, v in batch.items()}
        batch["advantages"] = plan.place(step["advantages"])

        def run(batch):
            ref = jax.block_until_ready(reference(model, batch))
            jax.block_until_ready(update(model, {**batch, "ref_logp": ref}))
            return ref

        run(batch)  # compiles for this step's shapes
        t0 = time.perf_counter()
        ref = run(batch)
        seconds.append(time.perf_counter() - t0)
        rows.append(plan.cells * plan.rows)
        logprobs.append(np.asarray(ref)[plan.cell, plan.slot])
    width = batch["input_ids"].shape[2]
    return {"pack": pack, "rows": rows, "row_tokens": float(np.mean(rows)) * width,
            "seconds": seconds, "step_s": float(np.mean(seconds)), "logprobs": logprobs}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/rl_packing.json", help="JSON results path")
    p.add_argument("--prompts", type=int, default=32, help="prompts (groups) per step")
    p.add_argument("--group", type=int, default=16, help="completions per prompt, G")
    p.add_argument("--steps", type=int, default=4, help="steps, each with its own prompts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256, help="model width (FFN 4x, 4 heads, 2 KV heads)")
    p.add_argument("--vocab", type=int, default=2048, help="the model's vocab (token ids are taken modulo it)")
    p.add_argument("--arch", default="", help="0.5b, 1.5b, small or tiny (bench/common.py) under its own vocab")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--data-root", default="", help="data root (default $SID_DATA_ROOT, else ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: 8 prompts x 4, 1 layer x 64, 1 step")
    args = p.parse_args(argv)
    if args.tiny:
        args.prompts, args.group, args.steps, args.layers, args.hidden, args.vocab = 8, 4, 1, 1, 64, 512
    if args.arch:
        args.vocab = arch_vocab(args.arch)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts, _, _, trie = preset_rl_prompts(args.data_root)
    lengths = np.minimum([len(p) for p in prompts], PROMPT_LENGTH)
    model, steps = build_model(args), step_batches(args, lengths, trie)
    sides = [measure(args, model, trie, steps, pack) for pack in (False, True)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(sides[0]["logprobs"], sides[1]["logprobs"], strict=True))
    for side in sides:
        del side["logprobs"]
    record = {"benchmark": "rl_packing", "args": {k: v for k, v in vars(args).items() if k != "out"},
              **host_environment(), **jax_environment(),
              "one_per_row": sides[0], "packed": sides[1],
              "speedup": sides[0]["step_s"] / sides[1]["step_s"], "ref_logp_max_abs_diff": diff}  # fmt: skip
    columns = {"pack": "packed", "rows": "rows per step", "step_s": "s per step"}
    print(markdown_table(sides, columns))
    print(f"\npacked / one per row: {record['speedup']:.2f}x faster; reference log-probs differ by {diff:.3g} at most")
    write_json(args.out, record)
    print(f"wrote {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
