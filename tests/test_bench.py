"""The benchmark scripts' CPU smoke modes (bench/*.py --tiny), run as a user runs them, each in a subprocess (all
at once to share the wall clock); their JSON is checked against hand-computed values and each other."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sid.hlo import Collective

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    # muon_optax is the same code path as muon_local here (an optimizer name); leaving it out halves the runtime.
    "train": [
        *("bench/train_throughput.py", "--tiny", "--optimizers", "adamw,muon_local"),
        *("--supervised-fraction", "0.25"),
    ],
    "train_once": [
        *("bench/train_throughput.py", "--tiny", "--optimizers", "adamw", "--torch", "off", "--gather-once"),
        *("--supervised-fraction", "0.25"),
    ],
    "eval": ["bench/eval_throughput.py", "--tiny"],
    "nanogpt": ["bench/nanogpt_shakespeare.py", "--tiny"],
    "newton_schulz": ["bench/newton_schulz.py", "--tiny"],
    "collectives": ["bench/step_collectives.py", "--tiny"],
    "collectives_once": ["bench/step_collectives.py", "--tiny", "--gather-once", "--optimizers", "adamw"],
    "beam_collectives": ["bench/step_collectives.py", "--tiny", "--program", "beam"],
}
TINY_VOCAB = 1000  # train_throughput's tiny vocab (padded to 1024 rows)
SHAKESPEARE_CHARS = 65


def bench_env(shared_data) -> dict[str, str]:
    """The environment of a bench script's smoke run: CPU, 2 simulated devices, the shared data root."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",  # Less LLVM optimisation: the smoke runs are dominated by XLA compile time on a small CPU.
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        SID_DATA_ROOT=str(shared_data),
    )


def bench_module(monkeypatch, name: str):
    """bench/NAME.py imported as a module (with bench/ on the path, for its `common` import)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("bench")
    env = bench_env(shared_data)
    procs = {}
    for name, cmd in SCRIPTS.items():  # output to files: a full pipe would stall a script while we wait on another
        with open(tmp / f"{name}.stdout", "w") as stdout, open(tmp / f"{name}.stderr", "w") as stderr:
            extra = ["--profile", str(tmp / "profile")] if name == "train" else []
            procs[name] = subprocess.Popen(
                [sys.executable, *cmd, "--out", str(tmp / f"{name}.json"), *extra],
                cwd=ROOT,
                env=env,
                stdout=stdout,
                stderr=stderr,
            )
    out = {}
    for name, proc in procs.items():
        proc.wait(timeout=600)
        assert proc.returncode == 0, f"{name}: {(tmp / f'{name}.stderr').read_text()[-3000:]}"
        out[name] = (json.loads((tmp / f"{name}.json").read_text()), (tmp / f"{name}.stdout").read_text(), tmp)
    return out


def test_help_runs():
    for cmd in SCRIPTS.values():
        proc = subprocess.run([sys.executable, cmd[0], "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and "--out" in proc.stdout and "--tiny" in proc.stdout, proc.stderr


TINY = dict(d=64, f=172, layers=2, heads=4, kv=2, rows=1024)  # bench/common.py's tiny arch, vocab padded to 1024


def tiny_params() -> int:
    """Params of the tiny Qwen2 (tied head counted once as the embedding)."""
    d, f, layers, heads, kv, rows = TINY.values()
    hd = d // heads
    per_layer = (d * heads * hd + heads * hd) + 2 * (d * kv * hd + kv * hd) + heads * hd * d + 3 * d * f + 2 * d
    return rows * d + layers * per_layer + d


def tiny_step_flops(seq: int, tokens: int, targets: int) -> float:
    """Per token 6 x the layers' matmul params + 12 x layers x heads x head_dim x seq; per target 6 x the tied head."""
    head = TINY["rows"] * TINY["d"]
    return (6.0 * (tiny_params() - head) + 12.0 * TINY["layers"] * TINY["d"] * seq) * tokens + 6.0 * head * targets


def test_train_throughput(results):
    record, stdout, _ = results["train"]
    rows = {(r["framework"], r["optimizer"]): r for r in record["results"]}
    assert set(rows) == {("jax", "adamw"), ("jax", "muon_local"), ("torch", "adamw")}
    for r in rows.values():
        assert "error" not in r, r
        assert r["real_tokens_per_step"] == r["rows"] * r["seq"] == 4 * 64  # packed full rows: no padding
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["real_tokens_per_step"] / r["step_s"])
        assert r["vocab_rows"] == 1024
        # Random init with std 0.02 gives near-uniform predictions: the first loss is about log(vocab).
        assert r["first_loss"] == pytest.approx(math.log(TINY_VOCAB), abs=0.15)
        assert math.isfinite(r["last_loss"])
        assert r["mfu"] is None  # no peak FLOP/s is known for a CPU
        if r["framework"] == "jax":  # --profile traced extra steps; a CPU trace has no device plane to tabulate
            assert r["top_kernels"] == []
            assert list((results["train"][2] / "profile" / f"tiny_seq64_{r['optimizer']}").rglob("*.xplane.pb"))
    for opt in ("adamw", "muon_local"):
        r = rows[("jax", opt)]
        # Each segment (random length 8..32) supervises the last quarter of its targets: about 4 x 64 x 0.25.
        targets = r["supervised_tokens_per_step"]
        assert 40 <= targets <= 90
        assert r["flops_per_token"] * r["real_tokens_per_step"] == pytest.approx(tiny_step_flops(64, 4 * 64, targets))
        assert 0 < r["compile_s"] <= r["first_step_s"]
        assert r["xla_bytes"] > 0 and r["devices"] == 2
    # --gather-once on the same 2 devices (fsdp2): the same first step up to float order. (Not the last loss: the
    # run above traced extra steps for --profile. tests/test_mesh.py checks the mode's gradients.)
    (once,) = results["train_once"][0]["results"]
    assert once["gather_once"] and not rows[("jax", "adamw")]["gather_once"] and "error" not in once
    assert once["first_loss"] == pytest.approx(rows[("jax", "adamw")]["first_loss"], rel=1e-6)
    assert once["tokens_per_s"] > 0
    (ratio,) = record["ratios"]
    assert ratio["muon_local_over_adamw_step_time"] == pytest.approx(
        rows[("jax", "muon_local")]["step_s"] / rows[("jax", "adamw")]["step_s"]
    )
    assert ratio["jax_over_torch_tokens_per_s"] == pytest.approx(
        rows[("jax", "adamw")]["tokens_per_s"] / rows[("torch", "adamw")]["tokens_per_s"]
    )
    assert ratio["muon_optax_over_adamw_step_time"] is None  # not run
    assert "| jax | tiny | 64 | 4 | adamw |" in stdout


def test_eval_throughput(results):
    record, stdout, _ = results["eval"]
    ours, hf = record["jax"], record["hf"]
    assert "error" not in ours and "error" not in hf, (ours, hf)
    assert ours["n_samples"] == 8 and hf["n_samples"] == 4
    assert ours["beams"] == hf["beams"] == 8
    # Constrained search never produces a SID outside the catalog (8 beams < 48 first-level codes).
    assert ours["invalid_predictions"] == 0 and hf["invalid_predictions"] == 0
    assert ours["buckets_used"] == [128]  # every Industrial test prompt has <= 121 tokens
    assert ours["samples_per_s"] == pytest.approx(ours["n_samples"] / ours["search_s"])
    assert hf["samples_per_s"] == pytest.approx(hf["n_samples"] / hf["generate_s"])
    assert ours["compile_s"] > 0 and ours["batch"] % ours["devices"] == 0
    assert record["jax_over_hf_samples_per_s"] == pytest.approx(ours["samples_per_s"] / hf["samples_per_s"])
    assert "| sid (jax) | tiny | 8 | 8 |" in stdout


def test_nanogpt_shakespeare(results):
    record, stdout, tmp = results["nanogpt"]
    runs = {r["name"]: r for r in record["runs"]}
    assert {n: r["optimizer"] for n, r in runs.items()} == {"adamw": "adamw", "muon": "muon_local"}
    for r in runs.values():
        steps, losses = zip(*r["eval_curve"], strict=True)
        assert steps == (10, 20) and r["steps"] == 20
        assert r["best_eval_loss"] == min(losses) and r["best_eval_step"] == steps[losses.index(min(losses))]
        # Learned something: below the loss of a uniform guess over the 65 characters.
        assert r["best_eval_loss"] < math.log(SHAKESPEARE_CHARS)
        assert r["tokens_per_step"] == 16 * 64
        assert r["median_tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_ms_per_iter"] * 1000)
        assert r["ms_per_iter"] > 0 and r["compile_s"] > 0
        assert (Path(r["run_dir"]) / "run_summary.json").is_file()
    png = Path(record["png"])
    assert png.parent == tmp and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| muon | muon_local | 20 |" in stdout


def test_newton_schulz(results):
    record, stdout, _ = results["newton_schulz"]
    (res,) = record["results"]
    # The tiny architecture's hidden matrices, as routed to Muon: q, o 64x64; k, v 32x64; gate, up 172x64; down 64x172.
    assert sorted(tuple(s) for s in res["shapes"].values()) == sorted(
        [(64, 64)] * 2 + [(32, 64)] * 2 + [(172, 64)] * 2 + [(64, 172)]
    )

    def hand_flops(m, n, method):  # m <= n; Gram NS only where it is cheaper (n > 1.5 m)
        standard = 5 * (4 * m * m * n + 2 * m**3)
        return 8 * m * m * n + 28 * m**3 if method == "gram" and n > 1.5 * m else standard

    rows = {r["method"]: r for r in res["rows"]}
    for method, dtype in (("standard", "bfloat16"), ("gram", "float16")):
        r = rows[method]
        assert r["dtype"] == dtype and r["layers"] == 2 and r["ms"] > 0
        expected = 2 * sum(hand_flops(min(s), max(s), method) for s in res["shapes"].values())
        assert r["tflop"] * 1e12 == pytest.approx(expected)
        assert r["tflop_per_s"] == pytest.approx(r["tflop"] / r["ms"] * 1000)
        assert 0 < r["max_rel_err_vs_f32"] < 0.1
    assert rows["gram"]["tflop"] < rows["standard"]["tflop"]
    assert rows["gram"]["max_rel_err_vs_f32"] < rows["standard"]["max_rel_err_vs_f32"]
    assert "| tiny | 2 | gram | float16 |" in stdout


def test_kernel_table_sums_device_streams_per_step():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    kernel_table = common.kernel_table

    def obj(name, items, field):
        return type("X", (), {"name": name, field: items})()

    def event(name, ns):
        return type("E", (), {"name": name, "duration_ns": ns})()

    gemm, copy = event("gemm", 3e6), event("MemcpyD2D", 1e6)
    planes = [
        obj("/host:CPU", [obj("python", [event("gemm", 9e9)], "events")], "lines"),
        obj(
            "/device:GPU:0",
            [
                obj("Stream #14(Compute)", [gemm, gemm, copy, gemm, gemm], "events"),
                obj("XLA Ops", [event("fusion.1", 7e6)], "events"),  # the same time again, by HLO op
            ],
            "lines",
        ),
    ]
    table = kernel_table(planes, steps=2)
    assert table == [
        {"name": "gemm", "ms_per_step": 6.0, "calls_per_step": 2.0},
        {"name": "MemcpyD2D", "ms_per_step": 0.5, "calls_per_step": 0.5},
    ]
    assert kernel_table(planes, steps=2, top=1) == table[:1]


def test_packed_batch_supervises_each_segments_tail(monkeypatch):
    mod = bench_module(monkeypatch, "train_throughput")
    for fraction in (1.0, 0.25):
        b = mod.packed_batch(6, 64, 1000, seed=3, supervised=fraction)
        for r in range(6):
            for seg in np.unique(b["segment_ids"][r]):
                (where,) = np.nonzero(b["segment_ids"][r] == seg)
                n, t = len(where), b["targets"][r, where]
                want = min(n - 1, max(1, round(fraction * (n - 1))))  # a tail of targets; never the segment's last
                assert (t[: n - 1 - want] == -100).all() and (t[n - 1 :] == -100).all()
                np.testing.assert_array_equal(t[n - 1 - want : n - 1], b["input_ids"][r, where][n - want :])


def test_step_collectives(results):
    record, stdout, _ = results["collectives"]
    runs = {(r["mesh"], r["optimizer"]): r["collectives"] for r in record["results"]}
    assert set(runs) == {(m, o) for m in ("1x2x1", "1x1x2") for o in ("adamw", "muon_local")}
    for (mesh, optimizer), parts in runs.items():
        # Activations keep their batch split: no re-layout anywhere in the forward and backward.
        assert not any(k.startswith(("fwd_bwd/all-to-all", "fwd_bwd/collective-permute")) for k in parts), parts
        # Everything in the micro-batch loop runs once per micro-batch (2), or once per layer (2) of each.
        assert all(v["count"] % 2 == 0 for k, v in parts.items() if k.startswith("fwd_bwd/")), parts
        assert parts["fwd_bwd/all-gather" if mesh == "1x2x1" else "fwd_bwd/all-reduce"]["gb"] > 0
        if optimizer == "muon_local":  # whole matrices per device: two all-to-alls per stack, no gathered Grams
            assert "update/all-to-all" in parts
            assert parts.get("update/all-gather", {"gb": 0})["gb"] < 1e-6
    for r in record["results"]:  # the tiny model split two ways: half its f32 params per device
        assert r["params_gib_per_device"] * 2**30 == pytest.approx(4 * tiny_params() / 2, rel=0.02)
        assert r["opt_state_gib_per_device"] > r["params_gib_per_device"]
        assert r["temp_gib_per_device"] >= r["params_gib_per_device"]  # it holds the f32 gradient accumulator
    assert "| tiny | 1x2x1 | muon_local | update/all-to-all |" in stdout
    # --gather-once (train.gather_params_once): on fsdp2 the micro-batch loop sends nothing param-sized; outside it
    # each device gathers the whole f32 params once and the gradients are summed once.
    once = {r["mesh"]: r for r in results["collectives_once"][0]["results"]}
    assert once["1x2x1"]["gather_once"] and set(once) == {"1x2x1", "1x1x2"}
    fsdp2 = once["1x2x1"]["collectives"]
    assert "fwd_bwd/all-gather" not in fsdp2 and fsdp2["fwd_bwd/all-reduce"]["gb"] < 1e-6  # the chunk count's max
    assert fsdp2["update/all-gather"]["gb"] * 1e9 == pytest.approx(4 * tiny_params(), rel=1e-6)
    assert fsdp2["update/all-reduce"]["gb"] * 1e9 == pytest.approx(4 * tiny_params(), rel=1e-3)  # + a few scalars
    assert once["1x1x2"]["collectives"] == runs[("1x1x2", "adamw")]  # no fsdp: the same step
    # By op on fsdp2: the bf16 compute's weights are gathered in bf16 for matmuls; their gradients reduced in f32.
    # JAX 0.10 names a forward weight gather after its matmul, 0.11 after the weight's transpose.
    top = {(g["kind"], g["dtype"], g["op"]) for g in record["results"][0]["by_op"]}
    forward_weights = r"jvp\(\)/(eval_jaxpr/)?(dot_general|transpose)$"
    assert {dtype for kind, dtype, op in top if kind == "all-gather" and re.search(forward_weights, op)} == {"bf16"}
    assert any(kind == "all-reduce" and dtype == "f32" and op.endswith("->oi/dot_general") for kind, dtype, op in top)


def test_beam_search_collectives(results):
    record, stdout, _ = results["beam_collectives"]
    assert [r["mesh"] for r in record["results"]] == ["1x2x1", "1x1x2"]
    for r in record["results"]:
        assert set(r["collectives"]) <= {f"search/{k}" for k in ("all-gather", "all-reduce", "all-to-all")}
        groups = {(g["kind"], g["dtype"], g["op"]) for g in r["by_op"]}
        # The head is never gathered for the logits (the head matmul is `...d,vd->...v`); the devices holding its
        # rows combine their partial logsumexps and picked logits in f32 instead.
        assert not [op for kind, _, op in groups if kind == "all-gather" and "->...v" in op], groups
        assert any(kind == "all-reduce" and dtype == "f32" for kind, dtype, _ in groups), groups
    assert "| tiny | 1x2x1 | - | search/all-gather |" in stdout


def test_collectives_summed_per_step_and_grouped_by_op(monkeypatch):
    mod = bench_module(monkeypatch, "step_collectives")
    loop = "jit(f)/while/body/jvp()/dot_general"
    got = [
        Collective("all-gather", "f32", (4, 8), 128, runs=2, loops=1, op_name=loop),
        Collective("all-reduce", "bf16", (16,), 32, runs=6, loops=2),
        Collective("all-to-all", "f32", (2, 8), 76, runs=1, loops=0),
        Collective("collective-permute", "f32", (2,), 8, runs=1, loops=0),
        Collective("collective-permute", "f32", (2,), 8, runs=1, loops=0),
    ]
    assert mod.by_op(got, top=2) == [
        {"kind": "all-gather", "dtype": "f32", "op": "jvp()/dot_general", "gb": 256 / 1e9},
        {"kind": "all-reduce", "dtype": "bf16", "op": "", "gb": 192 / 1e9},
    ]
    assert mod.summarize(got) == {
        "fwd_bwd/all-gather": {"count": 2, "gb": 256 / 1e9},
        "fwd_bwd/all-reduce": {"count": 6, "gb": 6 * 32 / 1e9},
        "update/all-to-all": {"count": 1, "gb": 76 / 1e9},
        "update/collective-permute": {"count": 2, "gb": 16 / 1e9},
    }


@pytest.fixture(scope="module")
def rl_result(tmp_path_factory, shared_data):
    """bench/rl_throughput.py --tiny, alone (the `results` scripts are not needed by its tests)."""
    tmp = tmp_path_factory.mktemp("bench_rl")
    cmd = [sys.executable, "bench/rl_throughput.py", "--tiny", "--out", str(tmp / "rl.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "rl.json").read_text()), proc.stdout


def test_rl_throughput(rl_result):
    record, stdout = rl_result
    ours, base = record["sid"], record["baseline"]
    assert "error" not in ours and "error" not in base, (ours, base)
    parts = ("rollout_s", "host_s", "ref_logprobs_s", "update_s")
    for r in (ours, base):
        # --tiny: 4 prompts x 4 beams; every completion is Industrial's 3 SID tokens, "\n" and EOS.
        assert r["rows"] == r["prompts"] * r["group"] == 16 and r["completion_tokens"] == 5
        assert r["dtype"] == "float32" and r["arch"] == "tiny" and r["accum"] == 2
        assert all(r[k] > 0 for k in parts) and r["first_step_s"] > 0
        assert r["step_s"] == pytest.approx(sum(r[k] for k in parts))  # the split covers the whole step
        assert len(r["step_s_all"]) == 2 and r["step_s"] == pytest.approx(sum(r["step_s_all"]) / 2)
        assert math.isfinite(r["loss"]) and -1 <= r["reward_mean"] <= 1  # ranking: hit 1, rank penalties sum to -1
    assert ours["prompt_width"] == 128 and base["prompt_width"] <= 128  # sid pads to the eval bucket, HF to the longest
    assert base["invalid_completions"] == 0 and ours["devices"] == 2 and ours["xla_bytes"] > 0
    assert ours["packed_rows"] == 4  # no two of these prompts with their completions fit one row (docs, section 8)
    assert record["baseline_over_sid_step_s"] == pytest.approx(base["step_s"] / ours["step_s"])
    # The same initial weights (--same-weights): torch's reference log-probs of sid's first rollout match sid's (f32).
    check = base["cross_check"]
    assert check["ref_logp_max_abs_diff"] < 1e-4
    assert check["ref_logp_mean_torch"] == pytest.approx(check["ref_logp_mean_sid"], abs=1e-4)
    assert "| sid (jax) | tiny | float32 | 16 |" in stdout and "| HF generate + torch | tiny | float32 | 16 |" in stdout
    proc = subprocess.run(
        [sys.executable, "bench/rl_throughput.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--tiny" in proc.stdout and "--out" in proc.stdout, proc.stderr


@pytest.mark.parametrize("arch", [[], ["--arch", "tiny"]], ids=["trunk", "arch"])
def test_rl_packing_tiny(tmp_path, shared_data, arch):
    """bench/rl_packing.py --tiny (its own trunk, or a benchmarked architecture): the Industrial preset's prompt
    lengths packed into fewer rows than prompts, with the same reference log-probs as one prompt per row."""
    out = tmp_path / "packing.json"
    cmd = [sys.executable, "bench/rl_packing.py", "--tiny", *arch, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    alone, packed = record["one_per_row"], record["packed"]
    assert alone["rows"] == [8] and not alone["pack"] and packed["pack"]
    assert packed["rows"][0] < 8 and packed["row_tokens"] < alone["row_tokens"]
    assert alone["row_tokens"] == 8 * (512 + 4 * 4)  # rows as wide as the bucket and a group's fed completions
    assert record["ref_logp_max_abs_diff"] < 1e-5 and record["speedup"] > 0
    assert all(s > 0 for side in (alone, packed) for s in side["seconds"]) and "packed / one per row" in proc.stdout
    assert record["args"]["vocab"] == (1000 if arch else 512)  # --arch tiny's own vocab, else --tiny's trunk's


def test_rl_rollout_chunks_tiny(tmp_path, shared_data):
    """bench/rl_rollout_chunks.py --tiny: two length-sorted chunks of the preset's prompts run fewer padded prompt
    tokens than one, with the same beams."""
    out = tmp_path / "chunks.json"
    cmd = [sys.executable, "bench/rl_rollout_chunks.py", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    one, chunked = record["one_chunk"], record["chunked"]
    assert (one["chunks"], chunked["chunks"]) == (1, 2) and record["same_beams"] is True
    assert one["prompt_tokens"] in (8 * 128, 8 * 256, 8 * 512) and chunked["prompt_tokens"] <= one["prompt_tokens"]
    assert one["step_s"] > 0 and chunked["step_s"] > 0 and "2 chunks / 1" in proc.stdout


def test_rl_baseline_loss_matches_sid(monkeypatch):
    """The baseline's GRPO loss (upstream's, in torch) has sid.rl.loss.grpo_loss's value and gradient."""
    import jax
    import torch

    from sid.rl.loss import grpo_loss

    mod = bench_module(monkeypatch, "rl_throughput")
    rng = np.random.default_rng(0)
    logp = -rng.uniform(0.1, 3.0, (6, 5)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)  # a KL term that is not 0
    adv = rng.normal(size=6).astype(np.float32)  # not centred: the value is not 0 either
    mask = np.arange(5)[None, :] < np.array([5, 5, 4, 5, 3, 5])[:, None]  # completions of different lengths
    beta = 0.1

    def sid_loss(lp):
        loss_sum, count, _ = grpo_loss(lp, ref, None, mask, adv, beta=beta, kind="grpo")
        return loss_sum / count

    value, grad = jax.value_and_grad(sid_loss)(logp)
    lp = torch.tensor(logp, requires_grad=True)
    loss = mod.torch_grpo_loss(lp, torch.tensor(ref), torch.tensor(adv), torch.tensor(mask, dtype=torch.float32), beta)
    loss.mean().backward()
    assert float(loss.mean()) == pytest.approx(float(value), rel=1e-5)
    np.testing.assert_allclose(lp.grad.numpy(), np.asarray(grad), rtol=1e-5, atol=1e-7)
