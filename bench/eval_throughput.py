"""Ranking-eval throughput: sid's jitted trie-constrained beam search (sid.eval.beam.sharded_beam_search) over the
4,533 MiniOneRec Industrial test prompts, and HF `generate` with an upstream-style constrained logits processor.

Ours: the Qwen2.5-1.5B architecture (random init, the Qwen2 tokenizer at $SID_DATA_ROOT/qwen2_tokenizer + the
560 SID tokens, vocab padded to 128), 50 beams, prompts left-padded into length buckets (sid.eval.runner
.bucketed_batches). Every bucket shape is compiled first (compile_s) and run once untimed; then one timed pass over
all prompts, including fetching each batch's leaves to the host and mapping them to SID strings, as the eval runner
does. samples/s = prompts / that pass.

HF: `transformers.Qwen2ForCausalLM` of the same architecture in bf16 (as MiniOneRec's evaluate.py loads it), random
init, `generate(num_beams=50, num_return_sequences=50, length_penalty=0)` with a logits processor written like
MiniOneRec's ConstrainedLogitsProcessor: log-softmax, then a Python loop over every (prompt, beam) looking up the
allowed next tokens in a dict keyed by the generated prefix, -1e6 elsewhere. max_new_tokens = SID depth + 2
("\\n", EOS); upstream's larger limit stops at the same step, since nothing is allowed after EOS. It runs on the
first --hf-samples prompts (batches of --hf-batch, one untimed warmup batch); the ratio compares samples/s.

    python bench/eval_throughput.py --out runs/bench/eval_throughput.json            # GPU
    python bench/eval_throughput.py --tiny --out /tmp/eval_tiny.json                 # CPU smoke
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
    cuda_available,
    end_ids,
    hf_qwen2_config,
    host_environment,
    jax_environment,
    jax_memory,
    load_prompts,
    markdown_table,
    run_child,
    serve_child,
    upstream_constraint,
    write_json,
)


def measure_jax(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile every bucket, warm up, then one timed pass of sharded beam search over all prompts."""
    import jax

    from sid.config import MeshConfig
    from sid.eval.beam import sharded_beam_search
    from sid.eval.runner import bucketed_batches
    from sid.eval.trie import build_trie
    from sid.models.build import build_model
    from sid.parallel.mesh import data_parallel_size, make_mesh
    from sid.parallel.rules import param_shardings

    tok, catalog, prompts, _ = load_prompts(spec, spec["samples"])
    mesh = make_mesh(MeshConfig())
    trie = build_trie(catalog.sids, {t: tok.token_id(t) for t in catalog.sid_tokens()}, end_ids(tok))
    t0 = time.perf_counter()
    cfg = arch_config(spec["arch"], seed=spec["seed"], attention=spec["attention"], scan_unroll=spec["scan_unroll"])
    model, _ = build_model(cfg, tok)
    model = jax.device_put(model, param_shardings(model, mesh))
    jax.block_until_ready(model)
    init_s = time.perf_counter() - t0
    search = sharded_beam_search(mesh, model, num_beams=spec["beams"])
    batch = spec["batch"] - spec["batch"] % data_parallel_size(mesh) or data_parallel_size(mesh)
    batches = list(bucketed_batches(prompts, tuple(spec["buckets"]), batch, tok.pad_id))

    compiled, first = {}, {}
    t0 = time.perf_counter()
    for _, ids, mask in batches:
        if ids.shape not in compiled:
            compiled[ids.shape] = search.lower(model, trie.tables, ids, mask).compile()
            first[ids.shape] = (ids, mask)
    compile_s = time.perf_counter() - t0
    for shape, (ids, mask) in first.items():
        jax.block_until_ready(compiled[shape](model, trie.tables, ids, mask))

    predictions: list[list[str]] = []
    t0 = time.perf_counter()
    for idx, ids, mask in batches:
        out = compiled[ids.shape](model, trie.tables, ids, mask)
        predictions += trie.predictions(np.asarray(jax.device_get(out.leaves))[: len(idx)])
    search_s = time.perf_counter() - t0
    return {
        **spec,
        **jax_environment(),
        "batch": batch,
        "buckets_used": sorted({s[1] for s in compiled}),
        "n_samples": len(predictions),
        "init_s": init_s,
        "compile_s": compile_s,
        "search_s": search_s,
        "samples_per_s": len(predictions) / search_s,
        "invalid_predictions": sum(spec["beams"] - len(p) for p in predictions),
        **jax_memory(next(iter(compiled.values()))),
    }


def measure_hf(spec: dict[str, Any]) -> dict[str, Any]:
    """HF beam search with an upstream-style (Python loop + dict) constrained logits processor."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tok, catalog, prompts, _ = load_prompts(spec, spec["hf_samples"])
    UpstreamConstraint, sid_of_path, depth = upstream_constraint(tok, catalog)
    ends = end_ids(tok)

    torch.manual_seed(spec["seed"])
    cfg = arch_config(spec["arch"])
    rows = -(-tok.vocab_size // 128) * 128
    t0 = time.perf_counter()
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_qwen2_config(cfg, rows)).to(torch.bfloat16).eval()
    init_s = time.perf_counter() - t0
    generation = transformers.GenerationConfig(
        num_beams=spec["beams"],
        num_return_sequences=spec["beams"],
        length_penalty=0.0,
        do_sample=False,
        max_new_tokens=depth + len(ends),
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
    )

    def run(batch: list[list[int]]) -> list[tuple[int, ...]]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                generation_config=generation,
                logits_processor=transformers.LogitsProcessorList([UpstreamConstraint(width)]),
            )
        return [tuple(row) for row in out[:, width : width + depth].tolist()]

    chunks = [prompts[i : i + spec["hf_batch"]] for i in range(0, len(prompts), spec["hf_batch"])]
    run(chunks[0])
    sync()
    paths: list[tuple[int, ...]] = []
    t0 = time.perf_counter()
    for chunk in chunks:
        paths += run(chunk)
    sync()
    generate_s = time.perf_counter() - t0
    return {
        **spec,
        "backend": device,
        "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "n_samples": len(prompts),
        "init_s": init_s,
        "generate_s": generate_s,
        "samples_per_s": len(prompts) / generate_s,
        "invalid_predictions": sum(p not in sid_of_path for p in paths),
        "peak_bytes_in_use": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/eval_throughput.json", help="JSON results path")
    p.add_argument("--arch", default="1.5b", help="0.5b, 1.5b or tiny")
    p.add_argument("--beams", type=int, default=50)
    p.add_argument("--batch", type=int, default=64, help="prompts per beam-search call (a multiple of the devices)")
    p.add_argument("--samples", type=int, default=0, help="first N test prompts (0: all 4,533)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument(
        "--buckets",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[128, 256, 512],
        help="prompt length buckets (sid's eval default)",
    )
    p.add_argument(
        "--scan-unroll",
        type=int,
        default=1,
        help="layers per iteration of the layer scan (the layer count unrolls it fully)",
    )
    p.add_argument(
        "--hf",
        default="auto",
        choices=["auto", "on", "off"],
        help="HF generate baseline: auto = only when torch.cuda is available",
    )
    p.add_argument("--hf-samples", type=int, default=128, help="prompts for the HF baseline")
    p.add_argument("--hf-batch", type=int, default=8, help="prompts per HF generate call")
    p.add_argument("--data-root", default="", help="data root (default $SID_DATA_ROOT, else ../shared/data)")
    p.add_argument("--data-dir", default="minionerec_industrial", help="MiniOneRec dataset under the data root")
    p.add_argument("--tokenizer", default="qwen2_tokenizer", help="tokenizer directory under the data root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, 8 prompts, 8 beams, HF on 4")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.arch, args.beams, args.batch, args.samples, args.hf_samples, args.hf_batch = "tiny", 8, 4, 8, 4, 2
        args.hf = "on" if args.hf == "auto" else args.hf
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if serve_child(args, {"hf": measure_hf, "jax": measure_jax}):
        return 0
    if args.hf == "auto":
        args.hf = "on" if cuda_available() else "off"
    spec = {k: v for k, v in vars(args).items() if k not in ("out", "child", "tiny", "hf")}
    ours = run_child(__file__, dict(spec, framework="jax"))
    hf = run_child(__file__, dict(spec, framework="hf")) if args.hf == "on" else None
    ratio = ours["samples_per_s"] / hf["samples_per_s"] if hf and "error" not in hf and "error" not in ours else None
    write_json(
        args.out,
        {
            "benchmark": "eval_throughput",
            "args": spec,
            **host_environment(),
            "jax": ours,
            "hf": hf,
            "jax_over_hf_samples_per_s": ratio,
        },
    )
    rows = [dict(ours, system="sid (jax)"), *([dict(hf, system="HF generate")] if hf else [])]
    print(
        markdown_table(
            rows,
            {
                "system": "system",
                "arch": "arch",
                "beams": "beams",
                "n_samples": "samples",
                "samples_per_s": "samples/s",
                "compile_s": "compile s",
                "invalid_predictions": "invalid",
                "error": "error",
            },
        )
    )
    print(f"\nours / HF samples/s: {ratio if ratio is None else f'{ratio:.1f}x'}\nwrote {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
