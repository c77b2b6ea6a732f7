"""Newton–Schulz cost of one Muon step: every hidden matrix of a Qwen2.5 architecture orthogonalised, standard vs
Gram NS (sid.optim.muon.newton_schulz), and how far each lands from the float32 iteration.

Per method: wall time of one jitted call on all hidden matrices (stacked [layers, out, in], as the optimizer sees
them; median of --reps after a compiling call), its FLOPs (sid.optim.muon.ns_flops) and the FLOP/s reached. Per
matrix kind: the relative Frobenius distance from float32 standard NS on a gradient-like input (singular values
(1 + i)^-1, random singular vectors), on layer 0. This is the part of a Muon step that AdamW does not have.

    python bench/newton_schulz.py --archs 1.5b,0.5b --out runs/bench/newton_schulz.json     # GPU
    python bench/newton_schulz.py --tiny --out /tmp/ns_tiny.json                            # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
from common import arch_config, host_environment, jax_environment, markdown_table, write_json

METHODS = ("standard", "gram")


def hidden_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """[layers, out, in] of each matrix the Muons route to Muon (sid.optim.routing), by parameter path."""
    import equinox as eqx
    import jax

    from sid.models.qwen2 import Qwen2
    from sid.optim.routing import MUON, label_params
    from sid.pytree import path_str

    cfg = arch_config(arch, vocab_size=128)  # the vocab only sizes the embedding, which AdamW takes
    model = jax.eval_shape(lambda: Qwen2.init(cfg, key=jax.random.key(0)))
    params = eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    labels = jax.tree_util.tree_leaves_with_path(label_params(params))
    shapes = dict(jax.tree_util.tree_leaves_with_path(params))
    return {path_str(path): tuple(shapes[path].shape) for path, label in labels if label == MUON}


def gradient_like(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Singular values (1 + i)^-1 with random singular vectors (float32)."""
    m, n = shape
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u / (1.0 + np.arange(k))) @ v.T).astype(np.float32)


def measure(arch: str, layers: int, reps: int, seed: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from sid.optim.config import OptimizerConfig
    from sid.optim.muon import newton_schulz, ns_flops

    shapes = {k: s[-2:] for k, s in hidden_shapes(arch).items()}
    layers = layers or arch_config(arch).num_layers
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    mats = {
        k: jax.random.normal(key, (layers, *s), jnp.float32) for key, (k, s) in zip(keys, shapes.items(), strict=True)
    }
    rng = np.random.default_rng(seed)
    probes = {k: jnp.asarray(gradient_like(s, rng)) for k, s in shapes.items()}
    reference = {
        k: np.asarray(newton_schulz(p, dtype=jnp.float32, method="standard"), np.float64) for k, p in probes.items()
    }
    rows = []
    for method in METHODS:
        dtype = OptimizerConfig(name="muon_local", ns_method=method).resolved_ns_dtype  # what ns_dtype=auto runs
        fn = jax.jit(
            lambda ms, m=method, dt=dtype: {k: newton_schulz(x, dtype=jnp.dtype(dt), method=m) for k, x in ms.items()}
        )
        t0 = time.perf_counter()
        jax.block_until_ready(fn(mats))
        first_call_s = time.perf_counter() - t0  # compile + one run
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(mats))
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        flops = layers * sum(ns_flops(*s, steps=5, method=method) for s in shapes.values())
        errors = {}
        for k, p in probes.items():
            got = np.asarray(newton_schulz(p, dtype=jnp.dtype(dtype), method=method).astype(jnp.float32), np.float64)
            errors[k] = float(np.linalg.norm(got - reference[k]) / np.linalg.norm(reference[k]))
        rows.append(
            {
                "arch": arch,
                "layers": layers,
                "method": method,
                "dtype": dtype,
                "first_call_s": first_call_s,
                "ms": 1000 * seconds,
                "tflop": flops / 1e12,
                "tflop_per_s": flops / seconds / 1e12,
                "max_rel_err_vs_f32": max(errors.values()),
                "rel_err_vs_f32": errors,
            }
        )
    return {"arch": arch, "shapes": shapes, "rows": rows, "gram_over_standard_time": rows[1]["ms"] / rows[0]["ms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/bench/newton_schulz.json", help="JSON results path")
    p.add_argument("--archs", type=lambda s: s.split(","), default=["1.5b", "0.5b"], help="0.5b, 1.5b, tiny")
    p.add_argument("--layers", type=int, default=0, help="stacked layers per matrix (0: the architecture's)")
    p.add_argument("--reps", type=int, default=10, help="timed calls after the compiling one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: the tiny architecture, 2 timed calls")
    args = p.parse_args(argv)
    if args.tiny:
        args.archs, args.reps = ["tiny"], 2
    results = [measure(a, args.layers, args.reps, args.seed) for a in args.archs]
    write_json(
        args.out,
        {
            "benchmark": "newton_schulz",
            "args": vars(args),
            **host_environment(),
            **jax_environment(),
            "results": results,
        },
    )
    cols = {
        "arch": "arch",
        "layers": "layers",
        "method": "method",
        "dtype": "dtype",
        "ms": "ms",
        "tflop": "TFLOP",
        "tflop_per_s": "TFLOP/s",
        "max_rel_err_vs_f32": "max err vs f32",
    }
    print(markdown_table([r for res in results for r in res["rows"]], cols))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
