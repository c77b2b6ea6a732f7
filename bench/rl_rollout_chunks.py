"""What length-sorted rollout chunks save (`rl.rollout_chunks`): the RL stage's constrained beam search over a step's
prompts, all padded to the run's bucket (one chunk) against chunks of prompts sorted by length, each padded to its
own bucket (eval.prompt_buckets 128, 256, 512), on the same prompts.

Prompts are the MiniOneRec Industrial RL preset's (configs/rl/industrial.yaml: next_sid, title2sid, description2sid
and title_history, as `python -m sid.rl` builds and tokenizes them; the run's bucket is 512), --prompts of them
drawn at random per step; the model is a benchmarked architecture (bench/common.py) with random weights under
Qwen's vocab (beam search scores only the tokens the trie allows, so the trunk is most of its work). Each layout
rolls every step out once to compile its shapes, then the steps are timed; both layouts must give the same beams.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import arch_config, host_environment, jax_environment, markdown_table, preset_rl_prompts, write_json

BUCKETS = (128, 256, 512)


def measure(args: argparse.Namespace, chunks: int, model, data, steps: list[np.ndarray]) -> dict[str, Any]:
    """Seconds per rollout with `chunks` chunks, the padded prompt tokens per step, and every step's beams."""
    from sid.config import MeshConfig
    from sid.parallel.mesh import make_mesh
    from sid.rl.config import RLConfig
    from sid.rl.source import RolloutSource

    prompts, targets, tok, trie = data
    cfg = RLConfig(group_size=args.group, prompts_per_step=args.prompts, rollout_chunks=chunks)
    with tempfile.TemporaryDirectory() as run_dir:
        source = RolloutSource(trie, prompts, targets, model, cfg, make_mesh(MeshConfig()), prompt_length=BUCKETS[-1],
                               pad_id=tok.pad_id, seed=args.seed, run_dir=Path(run_dir), buckets=BUCKETS)  # fmt: skip
        widths = []
        rollout = source.rollout
        source.rollout = lambda m, t, ids, mask: (widths.append(ids.size), rollout(m, t, ids, mask))[1]
        for idx in steps:  # compiles every (chunk size, bucket) shape
            source._rollout(model, idx, 0)
        padded = sum(widths) / len(steps)
        t0 = time.perf_counter()
        beams = [source._rollout(model, idx, 0) for idx in steps]
        seconds = (time.perf_counter() - t0) / len(steps)
        source.close()
    return {"chunks": chunks, "prompt_tokens": padded, "step_s": seconds, "beams": beams}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/rl_rollout_chunks.json", help="JSON results path")
    p.add_argument("--arch", default="small", help="0.5b, 1.5b, small or tiny (bench/common.py)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step")
    p.add_argument("--group", type=int, default=16, help="beams per prompt, G")
    p.add_argument("--chunks", type=int, default=4, help="rl.rollout_chunks measured against 1")
    p.add_argument("--steps", type=int, default=4, help="timed steps, each with its own prompts")
    p.add_argument("--data-root", default="", help="data root (default $SID_DATA_ROOT, else ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, 8 prompts x 4 beams, 2 chunks, 1 step")
    args = p.parse_args(argv)
    if args.tiny:
        args.arch, args.prompts, args.group, args.chunks, args.steps = "tiny", 8, 4, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    from sid.models.build import build_model

    args = parse_args(argv)
    data = preset_rl_prompts(args.data_root)
    model, _ = build_model(arch_config(args.arch, seed=args.seed, compute_dtype=args.dtype, remat="none"), data[2])
    rng = np.random.default_rng(args.seed)
    steps = [rng.choice(len(data[0]), args.prompts, replace=False) for _ in range(args.steps)]
    sides = [measure(args, chunks, model, data, steps) for chunks in (1, args.chunks)]
    same = all(np.array_equal(a, b) for a, b in zip(sides[0].pop("beams"), sides[1].pop("beams"), strict=True))
    record = {"benchmark": "rl_rollout_chunks", "args": {k: v for k, v in vars(args).items() if k != "out"},
              **host_environment(), **jax_environment(),
              "one_chunk": sides[0], "chunked": sides[1], "speedup": sides[0]["step_s"] / sides[1]["step_s"],
              "same_beams": same}  # fmt: skip
    print(markdown_table(sides, {"chunks": "chunks", "prompt_tokens": "prompt tokens per step", "step_s": "s"}))
    print(f"\n{args.chunks} chunks / 1: {record['speedup']:.2f}x faster; the same beams: {same}")
    write_json(args.out, record)
    print(f"wrote {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
