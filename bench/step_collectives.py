"""What a sharded train step (or beam search) sends between devices, read from its HLO: no accelerator needed.

Compiles sid's train step (sid.step.make_train_step + sid.loss.sft_loss) for the Qwen2.5 architectures on a
(dp, fsdp, tp) mesh of simulated CPU devices, from abstract params (nothing is allocated, so 1.5B compiles on a
laptop), and sums every collective's per-device output bytes, each weighted by how often it runs in one optimizer
step (the trip counts of the layer and micro-batch loops around it). Reported per kind, split into the forward /
backward (inside the micro-batch loop) and the optimizer update (outside it), with the bytes of params and
optimizer state each device holds.

The HLO read is the SPMD partitioner's output (`sid.hlo.partitioned_hlo`): which tensors cross devices, how, and in
which dtype, before any backend rewrites them. (The CPU backend's own compiled HLO would report bfloat16 payloads as
float32.) Backends then rewrite the collectives (GPU and TPU turn an all-reduce followed by a slice into a
reduce-scatter, and combine small ones), so treat the figures as a layout check and an upper bound, not a bandwidth
measurement.

`--program beam` reads the eval's trie-constrained beam search instead (sid.eval.beam.sharded_beam_search, one
batch of prompts, a synthetic catalog shaped like Industrial's): GB per device per batch of prompts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python bench/step_collectives.py --archs 1.5b --meshes 1x8x1,2x2x2 --out runs/bench/step_collectives.json
    python bench/step_collectives.py --tiny --out /tmp/collectives_tiny.json                  # CPU smoke
    python bench/step_collectives.py --tiny --program beam --out /tmp/beam_collectives_tiny.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from common import arch_config, arch_vocab, host_environment, markdown_table, sft_train_step, write_json

if TYPE_CHECKING:
    from sid.hlo import Collective


PARTS = {"train": ("fwd_bwd", "update"), "beam": ("search", "search")}
"""Per program, the names of the parts inside and outside its loops (beam search's layer scans run in its prefill
and its decoding steps alike, so it is one part)."""
INDUSTRIAL_CODEBOOKS = (48, 256, 256)
"""Codes per SID level of MiniOneRec Industrial (3,686 items), for the synthetic beam-search catalog."""


def summarize(collectives: list[Collective], parts: tuple[str, str] = PARTS["train"]) -> dict[str, dict[str, float]]:
    """Per part (`parts`: inside the loops, outside them; the train step's are fwd_bwd, inside the micro-batch loop,
    and update) and kind: executions and GB per device per optimizer step (or per beam-search batch)."""
    out: dict[str, dict[str, float]] = {}
    for c in collectives:
        part = parts[0] if c.loops else parts[1]
        row = out.setdefault(f"{part}/{c.kind}", {"count": 0, "gb": 0.0})
        row["count"] += c.runs
        row["gb"] += c.runs * c.bytes / 1e9
    return dict(sorted(out.items()))


def by_op(collectives: list[Collective], top: int) -> list[dict[str, Any]]:
    """The `top` (kind, dtype, op) groups by GB per device per optimizer step: which part of the model sends what."""
    groups: dict[tuple[str, str, str], float] = defaultdict(float)
    for c in collectives:
        groups[(c.kind, c.dtype, c.op)] += c.runs * c.bytes / 1e9
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return [{"kind": kind, "dtype": dtype, "op": op, "gb": gb} for (kind, dtype, op), gb in ranked]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile one configuration from abstract inputs and read its collectives."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from sid.config import MeshConfig
    from sid.hlo import hlo_collectives, partitioned_hlo
    from sid.models.qwen2 import Qwen2, pad_vocab
    from sid.optim.config import OptimizerConfig
    from sid.optim.schedule import make_schedule
    from sid.parallel.mesh import batch_sharding, data_parallel_size, make_mesh
    from sid.parallel.opt_state import state_shardings
    from sid.parallel.report import device_bytes
    from sid.parallel.rules import param_shardings
    from sid.step import TrainState

    dp, fsdp, tp = spec["mesh"]
    mesh = make_mesh(MeshConfig(dp=dp, fsdp=fsdp, tp=tp), jax.devices()[: dp * fsdp * tp])
    cfg = arch_config(spec["arch"], vocab_size=spec["vocab"], remat=spec["remat"])
    lr = make_schedule(1e-3, warmup_steps=0, total_steps=1, kind="constant", min_lr_ratio=1.0)
    optimizer = OptimizerConfig(name=spec["optimizer"], ns_method=spec["ns_method"]).build(
        learning_rate=lr, aux_learning_rate=lr, clip_norm=1.0
    )
    model = eqx.filter_eval_shape(lambda: pad_vocab(Qwen2.init(cfg, key=jax.random.key(0)), 128))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    opt_state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharding = TrainState(
        param_shardings(params, mesh), state_shardings(opt_state, params, mesh), replicated, replicated
    )
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32)),
        sharding,
    )
    rows = spec["rows_per_device"] * data_parallel_size(mesh) * spec["accum"]
    batch = {
        k: jax.ShapeDtypeStruct((rows, spec["seq"]), jnp.int32, sharding=batch_sharding(mesh))
        for k in ("input_ids", "positions", "segment_ids", "targets")
    }
    step = sft_train_step(static, optimizer, lr, mesh=mesh, state_sharding=sharding, spec=spec)
    t0 = time.perf_counter()
    compiled, hlo = partitioned_hlo(step.lower(state, batch))
    return {
        **spec,
        "mesh": "x".join(map(str, spec["mesh"])),
        "compile_s": time.perf_counter() - t0,
        "params_gib_per_device": device_bytes(state.params, sharding.params) / 2**30,
        "opt_state_gib_per_device": device_bytes(state.opt_state, sharding.opt_state) / 2**30,
        # XLA's buffer assignment on this backend: activations, gathered weights, the gradient accumulator.
        "temp_gib_per_device": compiled.memory_analysis().temp_size_in_bytes / 2**30,
        "collectives": summarize(collectives := hlo_collectives(hlo)),
        "by_op": by_op(collectives, spec["top_ops"]),
    }


def measure_beam(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile the eval's beam search for one batch of prompts from abstract params and read its collectives."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sid.config import MeshConfig
    from sid.eval.beam import sharded_beam_search
    from sid.eval.trie import build_trie
    from sid.hlo import hlo_collectives, partitioned_hlo
    from sid.models.qwen2 import Qwen2, pad_vocab
    from sid.parallel.mesh import batch_sharding, data_parallel_size, make_mesh
    from sid.parallel.rules import param_shardings

    dp, fsdp, tp = spec["mesh"]
    mesh = make_mesh(MeshConfig(dp=dp, fsdp=fsdp, tp=tp), jax.devices()[: dp * fsdp * tp])
    cfg = arch_config(spec["arch"], vocab_size=spec["vocab"])
    model = eqx.filter_eval_shape(lambda: pad_vocab(Qwen2.init(cfg, key=jax.random.key(0)), 128))
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), model, param_shardings(model, mesh)
    )
    # SID tokens are the vocab's last ids, as resize_vocab appends them; end tokens "\n" and EOS are Qwen's.
    codebooks = spec["codebooks"]
    first = spec["vocab"] - sum(codebooks)
    token_ids = {
        f"<{level}_{code}>": first + sum(codebooks[:i]) + code
        for i, (level, size) in enumerate(zip("abcdefgh", codebooks, strict=False))
        for code in range(size)
    }
    rng = np.random.default_rng(0)
    sids = {
        item: "".join(f"<{level}_{rng.integers(size)}>" for level, size in zip("abcdefgh", codebooks, strict=False))
        for item in range(spec["items"])
    }
    trie = build_trie(sids, token_ids, end_ids=(198 % first, 151643 % first))
    prompts = spec["prompts_per_device"] * data_parallel_size(mesh)
    ids, mask = (
        jax.ShapeDtypeStruct((prompts, spec["prompt_len"]), dtype, sharding=batch_sharding(mesh))
        for dtype in (jnp.int32, jnp.bool_)
    )
    search = sharded_beam_search(mesh, model, num_beams=spec["beams"])
    t0 = time.perf_counter()
    _, hlo = partitioned_hlo(search.lower(placed, trie.tables, ids, mask))
    return {
        **spec,
        "mesh": "x".join(map(str, spec["mesh"])),
        "compile_s": time.perf_counter() - t0,
        "collectives": summarize(collectives := hlo_collectives(hlo), PARTS["beam"]),
        "by_op": by_op(collectives, spec["top_ops"]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--out", default="runs/bench/step_collectives.json", help="JSON results path")
    p.add_argument("--archs", type=csv, default=["1.5b"], help="architectures: 0.5b, 1.5b, tiny")
    p.add_argument(
        "--meshes",
        type=lambda s: [tuple(int(n) for n in m.split("x")) for m in csv(s)],
        default=[(1, 8, 1), (2, 2, 2)],
        help="dp x fsdp x tp, comma-separated (e.g. 1x8x1 = the v6e-8 presets' fsdp8)",
    )
    p.add_argument("--optimizers", type=csv, default=["adamw", "muon_local"])
    p.add_argument("--ns-method", default="auto", choices=["auto", "gram", "standard"])
    p.add_argument("--seq", type=int, default=512, help="row length (the seed's max_len)")
    p.add_argument("--rows-per-device", type=int, default=16, help="rows per device per micro-batch (the seed's)")
    p.add_argument("--accum", type=int, default=8, help="micro-batches per step (the seed's)")
    p.add_argument(
        "--remat", default="dots", choices=["none", "full", "dots"], help="model.remat (the v6e-8 presets': full)"
    )
    p.add_argument(
        "--gather-once",
        action="store_true",
        help="train.gather_params_once: gather the params and reduce the gradients once per step, not per micro-batch",
    )
    p.add_argument("--by-op", type=int, default=0, metavar="N", help="also print the N largest senders by JAX op")
    p.add_argument(
        "--program", default="train", choices=sorted(PARTS), help="the train step, or the eval's beam search"
    )
    p.add_argument("--prompts-per-device", type=int, default=8, help="beam: prompts per device (the eval's)")
    p.add_argument("--prompt-len", type=int, default=128, help="beam: prompt length (the eval's first bucket)")
    p.add_argument("--beams", type=int, default=50, help="beam: beams per prompt (the eval's)")
    p.add_argument(
        "--tiny", action="store_true", help="CPU smoke: tiny model on 1x2x1 and 1x1x2, seq 64, 2 rows, 2 micro-batches"
    )
    args = p.parse_args(argv)
    args.codebooks, args.items = INDUSTRIAL_CODEBOOKS, 3686
    if args.tiny:
        args.archs, args.meshes, args.seq, args.rows_per_device, args.accum = ["tiny"], [(1, 2, 1), (1, 1, 2)], 64, 2, 2
        args.prompts_per_device, args.prompt_len, args.beams, args.codebooks, args.items = 2, 16, 8, (4, 4, 4), 40
    return args


def print_by_op(result: dict[str, Any], top: int, unit: str) -> None:
    """The `top` largest senders of one measurement, as a markdown table (nothing for top 0)."""
    if top:
        columns = {"kind": "collective", "dtype": "dtype", "op": "op", "gb": f"GB per device per {unit}"}
        print(markdown_table(result["by_op"][:top], columns))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax  # after argument parsing: --help must not start a backend

    results = []
    unit = "step" if args.program == "train" else "batch"
    for arch in args.archs:
        vocab = arch_vocab(arch)
        for mesh in args.meshes:
            if mesh[0] * mesh[1] * mesh[2] > jax.device_count():
                sys.exit(
                    f"mesh {'x'.join(map(str, mesh))} needs more than the {jax.device_count()} devices here: run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu"
                )
            if args.program == "beam":
                results.append(
                    measure_beam(
                        dict(
                            arch=arch,
                            mesh=mesh,
                            optimizer="-",
                            vocab=vocab,
                            prompts_per_device=args.prompts_per_device,
                            prompt_len=args.prompt_len,
                            beams=args.beams,
                            codebooks=args.codebooks,
                            items=args.items,
                            top_ops=max(args.by_op, 12),
                        )
                    )
                )
                print(f"{arch} {results[-1]['mesh']} beam search: compiled in {results[-1]['compile_s']:.1f} s")
                print_by_op(results[-1], args.by_op, unit)
            for optimizer in args.optimizers if args.program == "train" else ():
                spec = dict(
                    arch=arch,
                    mesh=mesh,
                    optimizer=optimizer,
                    ns_method=args.ns_method,
                    vocab=vocab,
                    seq=args.seq,
                    rows_per_device=args.rows_per_device,
                    accum=args.accum,
                    gather_once=args.gather_once,
                    remat=args.remat,
                    top_ops=max(args.by_op, 12),
                )
                results.append(measure(spec))
                r = results[-1]
                print(
                    f"{arch} {r['mesh']} {optimizer}: compiled in {r['compile_s']:.1f} s; per device: params "
                    f"{r['params_gib_per_device']:.3f} GiB, optimizer state {r['opt_state_gib_per_device']:.3f} GiB, "
                    f"temporaries {r['temp_gib_per_device']:.3f} GiB"
                )
                print_by_op(r, args.by_op, unit)
    rows = [
        {"arch": r["arch"], "mesh": r["mesh"], "optimizer": r["optimizer"], "part/kind": k, **v}
        for r in results
        for k, v in r["collectives"].items()
    ]
    print(markdown_table(rows, {"arch": "arch", "mesh": "mesh", "optimizer": "optimizer", "part/kind": "collective",
                                "count": f"per {unit}", "gb": f"GB per device per {unit}"}))  # fmt: skip
    write_json(args.out, {"benchmark": "step_collectives", "environment": host_environment(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
