"""Training throughput of the sharded jitted step (sid.step.make_train_step + sid.loss.sft_loss) on the
Qwen2.5-0.5B / 1.5B architectures, with AdamW and the Muons, and of `transformers` + torch on the same shapes.

Measured per configuration, each in a fresh process: real (non-padding) tokens/s over timed steps after warmup,
MFU (sid.models.flops.train_flops over sid.meter.peak_flops_per_device: the head's FLOPs count for supervised
tokens only, as the loss computes it), compile time of the first step, peak device memory. Rows are packed full
with synthetic token ids (random segment lengths, positions restarting per segment), so every token is real. By
default every token but the last of each segment is supervised; `--supervised-fraction 0.17` supervises only the
tail of each segment, as SFT supervises only completions (17% of the seed recipe's tokens). Random init, vocab =
Qwen2.5's 151,665 tokens + Industrial's 560 SID tokens, padded to a multiple of 128.

The torch baseline is `transformers.Qwen2ForCausalLM` with float32 params under bf16 autocast (as HF Trainer's
`bf16=True`), torch AdamW (fused on GPU), gradient checkpointing iff remat != none, and the same token ids as one
causal sample per row (HF's sdpa path has no packed-segment masks; its attention may skip the masked half).

    python bench/train_throughput.py --out runs/bench/train_throughput.json          # GPU sweep
    python bench/train_throughput.py --tiny --out /tmp/train_tiny.json               # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    arch_config,
    arch_vocab,
    cuda_available,
    hf_qwen2_config,
    host_environment,
    jax_environment,
    jax_memory,
    markdown_table,
    profile_steps,
    run_child,
    serve_child,
    sft_train_step,
    write_json,
)

VOCAB_MULTIPLE = 128
PROFILED_STEPS = 3  # extra steps traced with --profile, after the timed ones
LEARNING_RATES = {"adamw": (3e-4, 3e-4), "muon_local": (3e-3, 3e-4), "muon_optax": (3e-3, 3e-4)}
"""(learning rate, aux learning rate) of the seed recipes; speed does not depend on them."""


def packed_batch(rows: int, seq: int, vocab: int, seed: int, supervised: float = 1.0) -> dict[str, np.ndarray]:
    """Rows packed full with random-length segments of random token ids: the trainer's batch format. Each segment
    supervises its last `supervised` fraction of next-token targets (at least one), like a prompt + completion."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq), dtype=np.int32)
    positions = np.zeros((rows, seq), np.int32)
    segments = np.zeros((rows, seq), np.int32)
    targets = np.full((rows, seq), -100, np.int32)
    for r in range(rows):
        start, seg = 0, 1
        while start < seq:
            n = min(int(rng.integers(max(seq // 8, 2), seq // 2 + 1)), seq - start)
            end = start + n
            positions[r, start:end] = np.arange(n)
            segments[r, start:end] = seg
            first = end - 1 - min(n - 1, max(1, round(supervised * (n - 1))))
            targets[r, first : end - 1] = ids[r, first + 1 : end]
            start, seg = end, seg + 1
    return {"input_ids": ids, "positions": positions, "segment_ids": segments, "targets": targets}


def measure_jax(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration through sid's trainer step: init, compile, warmup, timed steps."""
    import equinox as eqx
    import jax

    import sid.loss
    from sid.config import MeshConfig
    from sid.meter import peak_flops_per_device
    from sid.models.flops import train_flops
    from sid.models.qwen2 import Qwen2, pad_vocab
    from sid.optim.config import OptimizerConfig
    from sid.optim.schedule import make_schedule
    from sid.parallel.host import to_global
    from sid.parallel.mesh import make_mesh
    from sid.step import init_state

    if spec["ce_chunk_elements"]:  # this child process measures one configuration: a module setting is fine
        sid.loss.CHUNK_ELEMENTS = spec["ce_chunk_elements"]

    mesh = make_mesh(MeshConfig())
    cfg = arch_config(
        spec["arch"],
        vocab_size=spec["vocab"],
        remat=spec["remat"],
        attention=spec["attention"],
        scan_unroll=spec["scan_unroll"],
    )
    lr, aux_lr = (
        make_schedule(v, warmup_steps=0, total_steps=1, kind="constant", min_lr_ratio=1.0)
        for v in LEARNING_RATES[spec["optimizer"]]
    )
    optimizer = OptimizerConfig(name=spec["optimizer"], ns_method=spec["ns_method"]).build(
        learning_rate=lr, aux_learning_rate=aux_lr, clip_norm=1.0
    )
    t0 = time.perf_counter()
    model = pad_vocab(Qwen2.init(cfg, key=jax.random.key(spec["seed"])), VOCAB_MULTIPLE)
    state, static, sharding = init_state(model, optimizer, seed=spec["seed"], mesh=mesh)
    del model  # the sharded state holds the params now
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    flops = train_flops(eqx.combine(state.params, static), spec["seq"])

    step = sft_train_step(static, optimizer, lr, mesh=mesh, state_sharding=sharding, spec=spec)
    batch = to_global(
        packed_batch(spec["rows"], spec["seq"], spec["vocab"], spec["seed"], spec["supervised_fraction"]), mesh
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    first_loss = float(metrics["loss"])
    first_step_s = compile_s + time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / spec["steps"]

    kernels = None
    if spec.get("profile"):

        def run_step():
            nonlocal state, metrics
            state, metrics = compiled(state, batch)
            return metrics

        trace_dir = Path(spec["profile"]) / f"{spec['arch']}_seq{spec['seq']}_{spec['optimizer']}"
        kernels = profile_steps(run_step, PROFILED_STEPS, trace_dir)
        # Fusion names in the trace are only meaningful next to the HLO that defines them.
        (trace_dir / "step.hlo.txt").write_text(compiled.as_text())
        print(markdown_table(kernels[:30], {"ms_per_step": "ms/step", "calls_per_step": "calls", "name": "kernel"}))

    tokens = int(metrics["tokens"])  # the trainer's count of non-padding tokens in the step
    targets = int(metrics["supervised_tokens"])
    step_flops = flops(tokens, targets)
    peak = peak_flops_per_device()
    n_devices = mesh.devices.size
    return {
        **spec,
        **jax_environment(),
        "valid_vocab": spec["vocab"],
        "vocab_rows": int(static.config.vocab_size),
        "init_s": init_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "step_s": step_s,
        "real_tokens_per_step": tokens,
        "supervised_tokens_per_step": targets,
        "tokens_per_s": tokens / step_s,
        "flops_per_token": step_flops / tokens,
        "peak_flops": peak * n_devices if peak else None,
        "mfu": step_flops / step_s / (peak * n_devices) if peak else None,
        "first_loss": first_loss,
        "last_loss": float(metrics["loss"]),
        **jax_memory(compiled),
        **({"top_kernels": kernels} if kernels is not None else {}),
    }


def measure_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """The same shapes through `transformers.Qwen2ForCausalLM` + torch AdamW under bf16 autocast."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(spec["seed"])
    cfg = arch_config(spec["arch"])
    rows_padded = math.ceil(spec["vocab"] / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    t0 = time.perf_counter()
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_qwen2_config(cfg, rows_padded))
    model.train()
    if spec["remat"] != "none":
        model.config.use_cache = False
        # transformers 5.x renamed gradient_checkpointing_enable (which now warns); older versions lack the new name.
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATES["adamw"][0],
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
        fused=device == "cuda",
    )
    forward = torch.compile(model) if spec["torch_compile"] else model
    batch = packed_batch(spec["rows"], spec["seq"], spec["vocab"], spec["seed"], spec["supervised_fraction"])
    ids = torch.from_numpy(batch["input_ids"]).long()
    # HF shifts labels itself: label t is the token at t, predicted at t - 1 where our target t - 1 is supervised.
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = torch.where(torch.from_numpy(batch["targets"][:, :-1]) >= 0, ids[:, 1:], -100)
    micro = list(zip(ids.to(device).chunk(spec["accum"]), labels.to(device).chunk(spec["accum"]), strict=True))
    sync()
    init_s = time.perf_counter() - t0

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for x, y in micro:
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = forward(input_ids=x, labels=y).loss / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = float(step())
    first_step_s = time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        loss = step()
    sync()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / spec["steps"]
    tokens = ids.numel()
    return {
        **spec,
        "backend": device,
        "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vocab_rows": rows_padded,
        "init_s": init_s,
        "first_step_s": first_step_s,
        "step_s": step_s,
        "real_tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "first_loss": first_loss,
        "last_loss": float(loss),
        "peak_bytes_in_use": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (arch, seq): Muon step time / AdamW step time, and our AdamW tokens/s over torch's. Gives each torch
    row its MFU from our FLOPs per token and device peak (the same model and device)."""
    ok = [r for r in results if "error" not in r]
    out = []
    for arch, seq in dict.fromkeys((r["arch"], r["seq"]) for r in results):
        find = {(r["framework"], r["optimizer"]): r for r in ok if (r["arch"], r["seq"]) == (arch, seq)}
        adamw, torch_ = find.get(("jax", "adamw")), find.get(("torch", "adamw"))
        row: dict[str, Any] = {"arch": arch, "seq": seq}
        for name in ("muon_local", "muon_optax"):
            muon = find.get(("jax", name))
            row[f"{name}_over_adamw_step_time"] = muon["step_s"] / adamw["step_s"] if muon and adamw else None
        row["jax_over_torch_tokens_per_s"] = (
            adamw["tokens_per_s"] / torch_["tokens_per_s"] if adamw and torch_ else None
        )
        if adamw and torch_:
            torch_["mfu"] = (
                torch_["tokens_per_s"] * adamw["flops_per_token"] / adamw["peak_flops"] if adamw["peak_flops"] else None
            )
        out.append(row)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--out", default="runs/bench/train_throughput.json", help="JSON results path")
    p.add_argument("--archs", type=csv, default=["0.5b", "1.5b"], help="architectures: 0.5b, 1.5b, small, tiny")
    p.add_argument(
        "--seqs",
        type=lambda s: [int(x) for x in csv(s)],
        default=[256, 512],
        help="row lengths (512: the seed's max_len)",
    )
    p.add_argument("--optimizers", type=csv, default=["adamw", "muon_local", "muon_optax"])
    p.add_argument("--tokens-per-step", type=int, default=16384, help="rows per step = this / seq (unless --rows)")
    p.add_argument("--rows", type=int, default=0, help="rows per optimizer step (global); 0: from --tokens-per-step")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (seed: 16 rows x 8 per device)")
    p.add_argument(
        "--supervised-fraction",
        type=float,
        default=1.0,
        help="supervised share of each segment's targets (its tail); 0.17: the seed recipe's SFT mix",
    )
    p.add_argument(
        "--remat", default="dots", choices=["none", "full", "dots"], help="dots: 1.5B at 16k tokens fits 80 GB"
    )
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument(
        "--ns-method", default="auto", choices=["auto", "gram", "standard"], help="muon_local's Newton–Schulz form"
    )
    p.add_argument(
        "--scan-unroll",
        type=int,
        default=1,
        help="layers per iteration of the layer scan (the layer count unrolls it fully)",
    )
    p.add_argument(
        "--ce-chunk-elements", type=int, default=0, help="logits elements per cross-entropy chunk (0: sid.loss's)"
    )
    p.add_argument(
        "--gather-once",
        action="store_true",
        help="train.gather_params_once (several devices: fsdp over them): params gathered once per step",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--torch",
        default="auto",
        choices=["auto", "on", "off"],
        help="transformers + torch baseline: auto = only when torch.cuda is available",
    )
    p.add_argument(
        "--profile",
        default="",
        help="trace a few extra steps of each JAX configuration into DIR/<config>/ and report its busiest kernels",
    )
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the HF model")
    p.add_argument("--torch-rows", type=int, default=0, help="rows per step for torch (0: same as ours)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, seq 64, 4 rows, 2 timed steps")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.supervised_fraction <= 1:
        p.error(f"--supervised-fraction must be in (0, 1], got {args.supervised_fraction}")
    if args.tiny:
        args.archs, args.seqs, args.rows, args.steps, args.warmup = ["tiny"], [64], 4, 2, 1
        args.torch = "on" if args.torch == "auto" else args.torch
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args, {"torch": measure_torch, "jax": measure_jax}):
        return 0
    if args.torch == "auto":
        args.torch = "on" if cuda_available() else "off"
    specs = []
    for arch in args.archs:
        vocab = arch_vocab(arch)
        for seq in args.seqs:
            rows = args.rows or max(args.tokens_per_step // seq, 1)
            base = dict(
                arch=arch,
                seq=seq,
                rows=rows,
                accum=args.accum,
                vocab=vocab,
                remat=args.remat,
                steps=args.steps,
                warmup=args.warmup,
                seed=args.seed,
                supervised_fraction=args.supervised_fraction,
            )
            specs += [
                dict(
                    base,
                    framework="jax",
                    optimizer=o,
                    attention=args.attention,
                    profile=args.profile,
                    ns_method=args.ns_method,
                    scan_unroll=args.scan_unroll,
                    ce_chunk_elements=args.ce_chunk_elements,
                    gather_once=args.gather_once,
                )
                for o in args.optimizers
            ]
            if args.torch == "on":
                specs.append(
                    dict(
                        base,
                        framework="torch",
                        optimizer="adamw",
                        rows=args.torch_rows or rows,
                        torch_compile=args.torch_compile,
                    )
                )
    results = [run_child(__file__, s) for s in specs]
    summary = ratios(results)
    write_json(
        args.out,
        {
            "benchmark": "train_throughput",
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            **host_environment(),
            "results": results,
            "ratios": summary,
        },
    )
    shown = [
        dict(
            r,
            peak_gib=r["peak_bytes_in_use"] / 2**30 if r.get("peak_bytes_in_use") else None,
            mfu_pct=100 * r["mfu"] if r.get("mfu") is not None else None,
            step_ms=1000 * r["step_s"] if "step_s" in r else None,
        )
        for r in results
    ]
    print(
        markdown_table(
            shown,
            {
                "framework": "framework",
                "arch": "arch",
                "seq": "seq",
                "rows": "rows",
                "optimizer": "optimizer",
                "tokens_per_s": "tokens/s",
                "mfu_pct": "MFU %",
                "step_ms": "step ms",
                "compile_s": "compile s",
                "peak_gib": "peak GiB",
                "error": "error",
            },
        )
    )
    print()
    print(
        markdown_table(
            summary,
            {
                "arch": "arch",
                "seq": "seq",
                "muon_local_over_adamw_step_time": "muon_local/adamw step",
                "muon_optax_over_adamw_step_time": "muon_optax/adamw step",
                "jax_over_torch_tokens_per_s": "ours/torch tokens/s",
            },
        )
    )
    print(f"\nwrote {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
