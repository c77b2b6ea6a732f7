"""Shared pieces of the benchmark scripts: the benchmarked architectures, the HF twin of a config, device memory,
isolated child runs, and the JSON / markdown output.

Each measurement that touches an accelerator runs in its own child process (`run_child`): JAX preallocates most
of the GPU at start-up, so torch cannot share a process with it, and `peak_bytes_in_use` only ever grows within
a process, so a per-configuration peak needs a fresh one. The parent process never initialises a backend.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from sid.models.config import ModelConfig

QWEN25_TOKENS = 151_665
"""Tokens of the Qwen2.5 tokenizer (151,643 BPE + 22 special)."""
INDUSTRIAL_SID_TOKENS = 560
"""SID tokens of MiniOneRec Industrial (3 levels)."""

ARCHS: dict[str, dict[str, Any]] = {
    # From the HF config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B (both tie the head to the embedding).
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2),
    # A CPU-sized trunk under Qwen's vocab: the head and the loss take most of its step, so a CPU can measure them.
    "small": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2),
    # CPU smoke size: exercises every code path in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2),
}


def arch_config(arch: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a benchmarked architecture (Qwen2.5 RoPE base 1e6, tied head, eps 1e-6)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
    return ModelConfig(**ARCHS[arch], rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, **overrides)


def arch_vocab(arch: str) -> int:
    """Valid tokens of a benchmarked model: Qwen2.5's vocab plus Industrial's SID tokens (1000 for `tiny`)."""
    return 1000 if arch == "tiny" else QWEN25_TOKENS + INDUSTRIAL_SID_TOKENS


def hf_qwen2_config(cfg: ModelConfig, vocab_rows: int):
    """`transformers.Qwen2Config` of the same architecture with `vocab_rows` embedding rows."""
    import transformers

    return transformers.Qwen2Config(
        vocab_size=vocab_rows,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        # Both spellings, as sid.compat.hf.export_qwen2 writes: transformers v5 reads the first, v4 the second.
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        initializer_range=cfg.init_std,
    )


def load_prompts(spec: dict[str, Any], limit: int):
    """The test split's tokenizer (with SID tokens) and catalog, and its first `limit` (0 = all) eval prompts,
    tokenized, with their target SIDs, read as `sid.eval` reads them. `spec` names the data root, the MiniOneRec
    dataset under it and the tokenizer directory."""
    from sid.data.config import DataConfig, TasksConfig, TokenizerConfig
    from sid.data.dataset import load_split
    from sid.data.tasks import eval_prompts
    from sid.data.tokenizer import build_tokenizer

    data = DataConfig(source="minionerec", dir=spec["data_dir"], data_root=spec["data_root"])
    interactions, catalog, _ = load_split(data, "test")
    tok = build_tokenizer(TokenizerConfig(path=spec["tokenizer"]), catalog.sid_tokens(), data_root=spec["data_root"])
    pairs = eval_prompts(interactions, TasksConfig())[: limit or None]
    return tok, catalog, tok.encode_batch([p for p, _ in pairs]), [t for _, t in pairs]


def preset_rl_prompts(root: str):
    """(the MiniOneRec Industrial RL preset's prompts (configs/rl/industrial.yaml, all four sets), tokenized as
    `python -m sid.rl` does; their target SIDs; the tokenizer; the catalog's trie). `root`: the data root, or ""."""
    from sid.config import cli
    from sid.data.dataset import dataset_dir, load_tokenizer, load_train_split
    from sid.eval.runner import catalog_trie
    from sid.jobs import RLJob
    from sid.paths import data_root
    from sid.rl.prompts import rl_prompts

    root = str(data_root(root))
    job = cli(RLJob, args=["--config", "configs/rl/industrial.yaml", "--data.data-root", root,
                           "--tokenizer.path", str(Path(root) / "qwen2_tokenizer")])  # fmt: skip
    run = Path(tempfile.mkdtemp())
    rows, catalog, _ = load_train_split(job.data, run)
    tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job.data, run), job.data.data_root)
    sets = rl_prompts(rows, catalog, job.tasks, job.rl, job.data.category_text, job.train.seed)
    pairs = [pair for prompts in sets.values() for pair in prompts]
    return tok.encode_batch([p for p, _ in pairs]), [t for _, t in pairs], tok, catalog_trie(tok, catalog)


def end_ids(tok) -> tuple[int, int]:
    """The tokens every completion ends with: "\\n" then EOS (as sid.eval.runner)."""
    newline = tok.encode("\n")
    assert len(newline) == 1, newline
    return newline[0], tok.eos_id


def upstream_constraint(tok, catalog):
    """The HF baselines' constraint, written like MiniOneRec's ConstrainedLogitsProcessor: log-softmax, then a Python
    loop over every (prompt, beam) looking up the allowed next tokens in a dict keyed by the generated prefix, -1e6
    elsewhere. Returns (the `transformers.LogitsProcessor` class, built with the prompt width; the SID of each SID
    token path; the SID depth)."""
    import torch
    import transformers

    ends = end_ids(tok)
    sid_of_path = {}
    allowed: dict[tuple[int, ...], set[int]] = {}  # generated prefix -> allowed next tokens (upstream's hash_dict)
    for sid in set(catalog.sids.values()):
        path = tuple(tok.encode(sid))
        sid_of_path[path] = sid
        full = path + ends
        for i in range(len(full)):
            allowed.setdefault(full[:i], set()).add(full[i])
    allowed_lists = {k: sorted(v) for k, v in allowed.items()}

    class UpstreamConstraint(transformers.LogitsProcessor):
        """MiniOneRec's ConstrainedLogitsProcessor, keyed by the tokens generated after the prompt."""

        def __init__(self, prompt_width: int):
            self.prompt_width = prompt_width

        def __call__(self, input_ids, scores):
            scores = torch.nn.functional.log_softmax(scores, dim=-1)
            mask = torch.full_like(scores, -1e6)
            for row, seq in enumerate(input_ids):
                tokens = allowed_lists.get(tuple(seq[self.prompt_width :].tolist()), [])
                if tokens:
                    mask[row, tokens] = 0
            return scores + mask

    return UpstreamConstraint, sid_of_path, len(next(iter(sid_of_path)))


def sft_train_step(static, optimizer, lr, *, mesh, state_sharding, spec: dict[str, Any]):
    """sid's jitted SFT step (`sid.step.make_train_step` + `sid.loss.sft_loss`) for a benchmark's `spec` (its
    `accum` micro-batches and `gather_once` mode)."""
    from sid.loss import sft_loss
    from sid.step import make_train_step

    return make_train_step(
        static,
        sft_loss,
        optimizer,
        accum=spec["accum"],
        mesh=mesh,
        state_sharding=state_sharding,
        lr_schedule=lr,
        gather_once=spec["gather_once"],
    )


def jax_memory(compiled=None) -> dict[str, int | None]:
    """Device memory: the runtime peak of this process (`peak_bytes_in_use`, None where the backend has no
    allocator stats, e.g. CPU) and XLA's static footprint of `compiled` (arguments + outputs - aliased + temp)."""
    import jax

    from sid.step import step_memory_bytes

    stats = jax.local_devices()[0].memory_stats() or {}
    out: dict[str, int | None] = {"peak_bytes_in_use": stats.get("peak_bytes_in_use")}
    need = step_memory_bytes(compiled) if compiled is not None else None
    if need is not None:
        out["xla_bytes"] = need
    return out


def kernel_table(planes, steps: int, top: int | None = None) -> list[dict[str, Any]]:
    """Device time per step by kernel (or copy) name from profiler planes, busiest first (all of them by default).

    Only device planes' stream lines count: they hold the kernels and copies, while the 'XLA Ops' / 'XLA Modules'
    lines cover the same time again, and host planes hold no device time.
    """
    total_ns: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for plane in planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                total_ns[event.name] += event.duration_ns
                calls[event.name] += 1
    return [
        {"name": name, "ms_per_step": ns / 1e6 / steps, "calls_per_step": calls[name] / steps}
        for name, ns in total_ns.most_common(top)
    ]


def profile_steps(run_step, steps: int, trace_dir: str | Path) -> list[dict[str, Any]]:
    """Run `run_step()` `steps` times under `jax.profiler.trace(trace_dir)` (after the timed steps, so tracing
    costs them nothing) and return `kernel_table` of the trace. Empty on a CPU, which traces no device plane."""
    import jax
    from jax.profiler import ProfileData

    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            out = run_step()
        jax.block_until_ready(out)
    newest = max(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    return kernel_table(ProfileData.from_file(str(newest)).planes, steps)


def jax_environment() -> dict[str, Any]:
    """What ran a JAX measurement (call it inside the child that measured)."""
    import jax

    devices = jax.devices()
    return {
        "backend": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "jax": jax.__version__,
    }


def host_environment() -> dict[str, Any]:
    """The host and source tree of a benchmark run (no backend is touched)."""
    from sid.run import git_sha

    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "argv": sys.argv,
    }


def run_child(script: str | Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `script --child JSON --out TMP` in a fresh process (its output passes through) and return its JSON
    result. Children catch their own errors (e.g. out of memory) and report `{"error": ...}`; a child that dies
    without a result gives one too, so one bad configuration does not end the sweep."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec), "--out", str(out)])
        if not out.is_file():
            result = {**spec, "error": f"child exited with status {proc.returncode} without a result (see its log)"}
        else:
            result = json.loads(out.read_text())
    # One line per configuration as it finishes, so a sweep cut short still leaves what it measured in its log.
    print(f"[bench result] {json.dumps(result)}", flush=True)
    return result


def child_result(spec: dict[str, Any], measure) -> dict[str, Any]:
    """`measure(spec)` with any exception turned into `{"error": ...}` (what `run_child` expects from a child)."""
    try:
        return measure(spec)
    except Exception as e:  # noqa: BLE001 -- an OOM or a backend error is a result of the sweep, not a crash
        traceback.print_exc()
        return {**spec, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def serve_child(args, measures: dict[str, Any]) -> bool:
    """In a child process (`--child SPEC`): measure SPEC with `measures[spec["framework"]]`, write the result to
    `--out` and return True; in the parent return False."""
    if not args.child:
        return False
    spec = json.loads(args.child)
    write_json(args.out, child_result(spec, measures[spec["framework"]]))
    return True


def cuda_available() -> bool:
    """Whether torch sees a GPU (asking creates no CUDA context)."""
    import torch

    return torch.cuda.is_available()


def write_json(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` as indented JSON (parent directories created), atomically: a temp file renamed over `path`,
    so a run killed mid-write leaves the previous version, never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A markdown table of `rows` with `columns` (key -> header); floats get 4 significant digits, None is '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)
