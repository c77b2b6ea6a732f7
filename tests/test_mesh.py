"""Sharding rules and what XLA makes of them: where every Qwen2 / nanoGPT param goes on a (dp, fsdp, tp) mesh, and
that the real models' train steps over 8 devices equal one device's and stay pure FSDP (+ Megatron tp): the
activations keep their batch split, so no collective ever re-lays them out or replicates them whole."""

import dataclasses
import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_qwen2

import sid.loss
from sid.config import MeshConfig
from sid.hlo import Collective, hlo_collectives, partitioned_hlo
from sid.loss import sft_loss
from sid.models.config import GPTConfig
from sid.models.nanogpt import GPT
from sid.models.qwen2 import Qwen2
from sid.nanogpt import gpt_loss
from sid.optim.config import OptimizerConfig
from sid.parallel.host import to_global
from sid.parallel.mesh import make_mesh, tp_head_warning
from sid.parallel.report import device_bytes, sharding_table
from sid.parallel.rules import PartitionRules, param_shardings, without_axis
from sid.step import init_state, make_train_step

QWEN = tiny_qwen2(hidden_size=64, intermediate_size=128, vocab_size=256, tie_word_embeddings=False, remat="dots")
GPT_CFG = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64, dropout=0.0, compute_dtype="float32")
REMAT_WARNING = "Involuntary full rematerialization"


def specs(model, mesh_cfg: MeshConfig) -> dict[str, P]:
    shardings = param_shardings(eqx.filter(model, eqx.is_array), make_mesh(mesh_cfg))
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def test_qwen2_param_specs_dp2_fsdp2_tp2():
    # [layers, out, in] weights: tp on heads / MLP width (column-parallel out, row-parallel in), fsdp on the other
    # dim; vocab tables split rows over tp and fsdp together; the layer axis is never split.
    column, row = P(None, "tp", "fsdp"), P(None, "fsdp", "tp")
    expected = {
        ".embed.weight": P(("tp", "fsdp"), None),
        ".lm_head.weight": P(("tp", "fsdp"), None),
        ".final_norm.weight": P("fsdp"),
        ".layers.attn_norm.weight": P(None, "fsdp"),
        ".layers.mlp_norm.weight": P(None, "fsdp"),
        **{f".layers.attn.{n}_proj.weight": column for n in "qkv"},
        **{f".layers.attn.{n}_proj.bias": P(None, "tp") for n in "qkv"},
        ".layers.attn.o_proj.weight": row,
        ".layers.mlp.gate_proj.weight": column,
        ".layers.mlp.up_proj.weight": column,
        ".layers.mlp.down_proj.weight": row,
    }
    assert specs(Qwen2.init(QWEN, key=jax.random.key(0)), MeshConfig(dp=2, fsdp=2, tp=2)) == expected


def test_sharding_table_and_bytes_per_device():
    mesh = make_mesh(MeshConfig(dp=2, fsdp=2, tp=2))
    opt = optax.adamw(1e-3)
    state, _, sharding = init_state(Qwen2.init(QWEN, key=jax.random.key(0)), opt, seed=0, mesh=mesh)
    # Per device, by hand from the specs above (f32): embed and lm_head 256x64/4 each, final_norm 64/2; per layer
    # norms 2 x 64/2, q and o 64x64/4, k and v 32x64/4, biases 64/2 + 2 x 32/2, gate/up/down 128x64/4.
    per_layer = 2 * 32 + 2 * 1024 + 2 * 512 + 32 + 2 * 16 + 3 * 2048
    params = 4 * (2 * 4096 + 32 + 2 * per_layer)
    assert device_bytes(state.params, sharding.params) == params == 107_648
    # AdamW: two moments split like the params, plus its replicated int32 step count.
    assert device_bytes(state.opt_state, sharding.opt_state) == 2 * params + 4
    table = sharding_table(state.params, sharding.params, state.opt_state, sharding.opt_state).splitlines()
    cells = [re.split(r"\s{2,}", line) for line in table]
    assert cells[0] == ["param", "shape", "split", "per device"]
    rows = {c[0]: c[1:] for c in cells[2:-1]}
    assert len(rows) == len(jax.tree.leaves(state.params))
    assert rows["embed.weight"] == ["(256, 64)", "(tp+fsdp, -)", "(64, 64)"]
    assert rows["layers.mlp.down_proj.weight"] == ["(2, 64, 128)", "(-, fsdp, tp)", "(2, 32, 64)"]
    assert rows["final_norm.weight"] == ["(64,)", "(fsdp)", "(32,)"]
    assert table[-1] == "per device: params 0.10 MiB + optimizer state 0.21 MiB"


def test_each_model_declares_its_partition_rules():
    # nanoGPT names its own tp fields (fused qkv c_attn and c_fc column-parallel, both c_proj row-parallel).
    got = specs(GPT.init(GPT_CFG, key=jax.random.key(0)), MeshConfig(dp=1, fsdp=4, tp=2))
    assert got[".layers.attn.c_attn.weight"] == got[".layers.mlp.c_fc.weight"] == P(None, "tp", "fsdp")
    assert got[".layers.attn.c_proj.weight"] == got[".layers.mlp.c_proj.weight"] == P(None, "fsdp", "tp")
    assert got[".wte"] == P(None, "fsdp")  # a vocab table, but 65 rows: neither axis divides them, fsdp takes features
    # The rules are the model's, not global names: a tree that declares none gets fsdp alone, Qwen2's names or not.
    mesh = make_mesh(MeshConfig(dp=1, fsdp=4, tp=2))
    tree = {"layers": {"q_proj": {"weight": jnp.zeros((2, 64, 32))}}, "embed": jnp.zeros((256, 64))}
    split = jax.tree.map(lambda s: s.spec, param_shardings(tree, mesh))
    assert split == {"layers": {"q_proj": {"weight": P(None, "fsdp", None)}}, "embed": P("fsdp", None)}

    class Declared(eqx.Module):
        q_proj: dict
        partition_rules = PartitionRules(column=frozenset({"q_proj"}))

    declared = param_shardings(Declared({"weight": jnp.zeros((64, 32))}), mesh)
    assert declared.q_proj["weight"].spec == P("tp", "fsdp")  # [out, in]: tp on out

    class Misdeclared(eqx.Module):
        w: jax.Array
        partition_rules = {"column": ["w"]}

    with pytest.raises(TypeError, match="partition_rules must be a PartitionRules"):
        param_shardings(Misdeclared(jnp.zeros(4)), mesh)


def test_qwen2_param_specs_fsdp8():
    got = specs(Qwen2.init(QWEN, key=jax.random.key(0)), MeshConfig())
    assert got[".embed.weight"] == got[".lm_head.weight"] == P("fsdp", None)  # 256 rows > 64 features
    assert got[".layers.mlp.gate_proj.weight"] == P(None, "fsdp", None)  # [2, 128, 64]: the larger dim
    assert got[".layers.mlp.down_proj.weight"] == P(None, None, "fsdp")  # [2, 64, 128]
    assert got[".layers.attn.k_proj.weight"] == P(None, None, "fsdp")  # [2, 32, 64]


def test_vocab_rows_that_no_axis_divides_leave_the_features_to_fsdp():
    # 65 characters: neither tp=2 nor fsdp=4 divides the rows, so fsdp splits the features (constrain_table
    # gathers them for lookups); wpe is not a vocab table and follows the general rule.
    got = specs(GPT.init(GPT_CFG, key=jax.random.key(0)), MeshConfig(fsdp=4, tp=2))
    assert got[".wte"] == P(None, "fsdp")
    assert got[".wpe"] == P(None, "fsdp")
    assert got[".layers.attn.c_attn.weight"] == P(None, "tp", "fsdp")


def qwen2_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, (rows, seq)).astype(np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()
    segments = np.ones((rows, seq), np.int32)
    segments[:, -3:] = 0  # padding
    targets = np.where(segments > 0, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    return {"input_ids": ids, "positions": positions, "segment_ids": segments, "targets": targets}


def sft_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """SFT-shaped rows: a prompt, then 3 supervised completion targets at a random place in each row."""
    batch = qwen2_batch(rows, seq, vocab, seed)
    starts = np.random.default_rng(seed + 1).integers(0, seq - 6, rows)
    supervised = (np.arange(seq) >= starts[:, None]) & (np.arange(seq) < starts[:, None] + 3)
    batch["targets"] = np.where(supervised, batch["targets"], -100).astype(np.int32)
    return batch


def gpt_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {k: r.integers(0, vocab, (rows, seq)).astype(np.int32) for k in ("input_ids", "targets")}


CASES = {
    "qwen2": (lambda: Qwen2.init(QWEN, key=jax.random.key(0)), sft_loss, lambda: qwen2_batch(16, 16, 256, 0)),
    "qwen2_bf16": (
        lambda: Qwen2.init(dataclasses.replace(QWEN, compute_dtype="bfloat16"), key=jax.random.key(0)),
        sft_loss,
        lambda: qwen2_batch(16, 16, 256, 0),
    ),
    "nanogpt": (lambda: GPT.init(GPT_CFG, key=jax.random.key(0)), gpt_loss, lambda: gpt_batch(16, 32, 65, 0)),
    "qwen2_sft": (lambda: Qwen2.init(QWEN, key=jax.random.key(0)), sft_loss, lambda: sft_batch(16, 16, 256, 0)),
}


def sgd():
    """Its update is the gradient itself: Adam's first update ~ sign(g) magnifies float noise where g ~ 0."""
    lr = optax.constant_schedule(1.0)
    return optax.sgd(lr), lr


def muon(method: str):
    """muon_local in float32 (so one device and eight agree to float noise), or muon_optax (method "optax", whose NS
    is float32 anyway); AdamW's aux rate is tiny for the same sign(g) reason."""
    lr = optax.constant_schedule(1e-2)
    if method == "optax":
        cfg = OptimizerConfig(name="muon_optax")
    else:
        cfg = OptimizerConfig(name="muon_local", ns_dtype="float32", ns_method=method)
    return cfg.build(learning_rate=lr, aux_learning_rate=1e-7, clip_norm=0.0), lr


MUON = {method: functools.partial(muon, method) for method in ("standard", "gram", "optax")}
"""One factory per method, so `single_device_step`'s cache sees the same optimizer twice."""


@functools.cache
def single_device_step(case: str, optimizer=sgd):
    return step_on(MeshConfig(), jax.devices()[:1], case, optimizer)


def step_on(
    mesh_cfg: MeshConfig, devices, case: str, optimizer=sgd, *, partitioned: bool = False, gather_once: bool = False
):
    """One step (2 micro-batches) of a real model on a mesh: (metrics, new params, HLO text). The HLO is the
    compiled module's, or with `partitioned` the SPMD partitioner's output (`sid.hlo.partitioned_hlo`)."""
    build, loss_fn, batch = CASES[case]
    mesh = make_mesh(mesh_cfg, devices)
    opt, lr = optimizer()
    state, static, sharding = init_state(build(), opt, seed=0, mesh=mesh)
    step = make_train_step(
        static, loss_fn, opt, accum=2, mesh=mesh, state_sharding=sharding, lr_schedule=lr, gather_once=gather_once
    )
    batch = to_global(batch(), mesh)
    lowered = step.lower(state, batch)
    if partitioned:
        compiled, hlo = partitioned_hlo(lowered)
    else:
        compiled = lowered.compile()
        hlo = compiled.as_text()
    new_state, metrics = compiled(state, batch)
    return jax.device_get(metrics), jax.device_get(new_state.params), hlo


def collectives(hlo: str, kinds: str, *, in_loops: bool | None = None) -> list[Collective]:
    """The collectives of `kinds` (a regex alternation) in HLO text. in_loops: only those JAX traced inside (True)
    or outside (False) a loop, such as the micro-batch loop; None: all."""
    return [
        c
        for c in hlo_collectives(hlo)
        if re.fullmatch(kinds, c.kind) and (in_loops is None or in_loops == ("while/body" in c.op_name))
    ]


MESHES = {"fsdp8": MeshConfig(), "dp2_fsdp4": MeshConfig(dp=2, fsdp=4), "dp2_fsdp2_tp2": MeshConfig(dp=2, fsdp=2, tp=2)}


@pytest.mark.parametrize("case", ["qwen2", "nanogpt"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_real_model_step_sharded_equals_single_device(case, mesh_name, capfd):
    single = single_device_step(case)
    sharded = step_on(MESHES[mesh_name], jax.devices(), case)
    np.testing.assert_allclose(sharded[0]["loss"], single[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded[0]["grad_norm"], single[0]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Activations keep their batch split end to end (constrain_batch / constrain_table, traced under the
    # mesh by traced_on): before, the partitioner split some of them by feature, re-laid them out with
    # all-to-alls and collective-permutes (fsdp8), and replicated them whole where tp met fsdp.
    assert REMAT_WARNING not in capfd.readouterr().err
    relayouts = collectives(sharded[2], "all-to-all|collective-permute")
    if MESHES[mesh_name].dp > 1:
        # Except XLA's partitioning of a lookup in a row-split vocab table (Qwen2's embedding) for rows that carry
        # the replica axis (sid.step._accumulate): it pairs devices up transposed and swaps results back, one
        # collective-permute per lookup and its index (1.5B, dp2 x fsdp4: 0.40 GB per device per step). JAX 0.11
        # names the index's after the broadcast that shapes it.
        lookup = r"jvp\(jit\(_take\)\)/(gather|broadcast_in_dim)$"
        relayouts = [r for r in relayouts if not (r.kind == "collective-permute" and re.search(lookup, r.op))]
    if case == "nanogpt" and MESHES[mesh_name].tp > 1:
        # Except GPT-2's fused c_attn under tp: its output splits as q|k|v, which straddles the tp shards.
        assert relayouts
    else:
        assert relayouts == []


@pytest.mark.parametrize("method", list(MUON))
@pytest.mark.parametrize("mesh_name", ["fsdp8", "dp2_fsdp2_tp2"])
def test_muon_orthogonalizes_whole_matrices_per_device(method, mesh_name):
    single = single_device_step("qwen2", MUON[method])
    sharded = step_on(MESHES[mesh_name], jax.devices(), "qwen2", MUON[method])
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The 2-layer stacks are padded to the 8 (or 4) param shards and re-split by layer (split_by_layer):
    # no Newton–Schulz step all-gathers or all-reduces partial Gram matrices any more, as it did (standard form,
    # fsdp8: 30 all-gathers and 25 matrix all-reduces; dp2 x fsdp2 x tp2: 35, 89 and 105 collective-permutes).
    # muon_optax runs optax's whole Muon branch on that layout (sid.optim.muon_optax.by_layer).
    # What is left is the all-to-alls and the scalar norms' reductions.
    # (With dp > 1 the replicas' gradient sum is the one matrix all-reduce outside the loop, before the update.)
    assert collectives(sharded[2], "all-gather", in_loops=False) == []
    assert collectives(sharded[2], "all-to-all", in_loops=False)
    reduces = collectives(sharded[2], "all-reduce", in_loops=False)
    matrices = [c for c in reduces if len(c.shape) == 3 and "replica_gradient_sum" not in c.op]
    assert matrices == []


def test_tp_that_splits_heads_is_exact_but_warned_about():
    # The tiny Qwen2 has 4 heads and 2 KV heads: tp=4 splits each KV head across two devices.
    assert tp_head_warning(2, heads=4, kv_heads=2) is None
    assert tp_head_warning(1, heads=3) is None
    warning = tp_head_warning(4, heads=4, kv_heads=2)
    assert warning.startswith("mesh.tp=4 does not divide the model's 2 kv heads:")
    single = single_device_step("qwen2")
    sharded = step_on(MeshConfig(dp=1, fsdp=2, tp=4), jax.devices(), "qwen2")
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # What the warning is about: attention re-lays out k/v (tp=2, which divides both counts, has none: above).
    assert collectives(sharded[2], "all-to-all|collective-permute")


@pytest.mark.parametrize("case", ["qwen2", "nanogpt"])
def test_dp_replicas_sum_gradients_once_per_step(case):
    # dp8: every device holds whole params, so any all-reduce inside the micro-batch loop would be a gradient
    # reduction per micro-batch (before sid.step._accumulate's per-replica vmap: 1.5B at 8 micro-batches sent
    # 49.4 GB per device per step instead of 6.2). Now each replica accumulates its rows and the sum comes once.
    single = single_device_step(case)
    sharded = step_on(MeshConfig(dp=8, fsdp=1), jax.devices(), case)
    np.testing.assert_allclose(sharded[0]["loss"], single[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    in_loop = [c for c in collectives(sharded[2], "all-reduce", in_loops=True) if c.shape]
    assert in_loop == []
    assert [c for c in collectives(sharded[2], "all-reduce", in_loops=False) if "replica_gradient_sum" in c.op]


@pytest.mark.parametrize("case", ["qwen2", "nanogpt", "qwen2_sft"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_gather_once_equals_single_device_and_moves_params_once_per_step(case, mesh_name):
    # train.gather_params_once: each device gathers the f32 params once, accumulates its own rows' whole gradient
    # over the micro-batches, and the devices sum the gradients once, after the micro-batch loop. Default FSDP
    # gathers the weights in every micro-batch's forward and backward and reduces every micro-batch's gradients.
    single = single_device_step(case)
    metrics, params, hlo = step_on(MESHES[mesh_name], jax.devices(), case, partitioned=True, gather_once=True)
    np.testing.assert_allclose(metrics["loss"], single[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], single[0]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # In the micro-batch loop nothing param-shaped crosses devices: no weight gathers and no gradient reductions
    # (Linear's weight gradient is the einsum "...o,...i->oi"). Under tp what is left is Megatron's activation
    # partial sums, each with the vmap's replica axis (one replica per device) in front.
    in_loop = collectives(hlo, "all-gather|all-reduce|reduce-scatter", in_loops=True)
    assert in_loop and [c for c in in_loop if "->oi" in c.op_name] == []
    mesh_cfg = MESHES[mesh_name]
    if mesh_cfg.tp == 1:
        assert [c for c in in_loop if c.shape] == []  # only the loss's chunk count (`replicas_max`) is left
    else:
        assert [c for c in in_loop if c.shape and c.shape[0] != 1] == []
    # Outside it: one gather of every fsdp-split param, whole over fsdp (and still split over tp), in f32.
    mesh = make_mesh(mesh_cfg)
    model_params = eqx.filter(CASES[case][0](), eqx.is_array)
    split = param_shardings(model_params, mesh)
    gathered = [
        (x, NamedSharding(mesh, without_axis(s.spec, "fsdp")))
        for x, s in zip(jax.tree.leaves(model_params), jax.tree.leaves(split), strict=True)
        if "fsdp" in jax.tree.leaves(tuple(s.spec))
    ]
    expected = device_bytes([x for x, _ in gathered], [s for _, s in gathered])
    once = [c for c in collectives(hlo, "all-gather", in_loops=False) if "gather_params_once" in c.op]
    assert {c.dtype for c in once} == {"f32"} and sum(c.runs * c.bytes for c in once) == expected
    assert [c for c in collectives(hlo, "all-reduce", in_loops=False) if "replica_gradient_sum" in c.op]


def test_without_axis_drops_one_axis_from_every_dim():
    assert without_axis(P(None, "tp", "fsdp"), "fsdp") == P(None, "tp", None)
    assert without_axis(P(("tp", "fsdp"), None), "fsdp") == P("tp", None)
    assert without_axis(P(("dp", "fsdp", "tp")), "fsdp") == P(("dp", "tp"))
    assert without_axis(P("fsdp"), "fsdp") == P(None)
    assert without_axis(P(("fsdp",)), "fsdp") == P(None)
    assert without_axis(P(None, "tp"), "fsdp") == P(None, "tp")


def test_each_dp_replica_draws_its_own_randomness():
    # A loss that scales replica r's only nonzero input by a uniform draw from the key it is given: the gradient of
    # w[r] is replica r's draw, so equal entries would mean every replica got the same dropout masks.
    def loss_fn(model, mb, key):
        return jax.random.uniform(key) * (mb["x"] @ model["w"]).sum(), jnp.int32(1)

    mesh = make_mesh(MeshConfig(dp=2, fsdp=1), jax.devices()[:2])
    opt, lr = sgd()
    state, static, sharding = init_state({"w": jnp.zeros(2)}, opt, seed=0, mesh=mesh)
    step = make_train_step(static, loss_fn, opt, accum=1, mesh=mesh, state_sharding=sharding, lr_schedule=lr)
    batch = {"x": np.eye(2, dtype=np.float32), "input_ids": np.zeros((2, 1), np.int32)}  # ids: for the token count
    new_state, _ = step(state, to_global(batch, mesh))
    draws = -np.asarray(new_state.params["w"]) * 2  # sgd at lr 1: w = -grad; grad = draw / (2 supervised counts)
    assert 0 < draws[0] < 1 and 0 < draws[1] < 1 and draws[0] != draws[1]


@pytest.mark.parametrize("mesh_name", ["fsdp8", "dp2_fsdp4"])
def test_fsdp_sends_bfloat16_weights_and_activations_and_reduces_float32_gradients(mesh_name):
    # Read off the partitioner's output: the CPU backend widens bfloat16 collectives afterwards, so the compiled HLO
    # shows float32 everywhere. Weights are cast before they are gathered (half the bytes). Their gradients come
    # out of the matmuls in float32 (sid.models.layers.Linear's VJP), so each device's partial sums are reduced
    # in float32; autodiff reduced them in bfloat16, after rounding each device's partial sum to bfloat16.
    # The embedding lookup in its row-split table is a sum of each device's rows, exact in bfloat16, and its
    # gradient rows are gathered in bfloat16 before they are scattered into the table in float32.
    *_, hlo = step_on(MESHES[mesh_name], jax.devices(), "qwen2_bf16", partitioned=True)
    # Weight gathers are told apart by shape: JAX 0.10 names them after the matmul, 0.11 after the weight's
    # transpose (forward) or cast (backward).
    matrices = {w.shape[1:] for w in jax.tree.leaves(CASES["qwen2_bf16"][0]().layers) if w.ndim == 3}
    matrices |= {s[::-1] for s in matrices}
    weight_gathers = [c for c in collectives(hlo, "all-gather", in_loops=True) if c.shape in matrices]
    assert weight_gathers and {c.dtype for c in weight_gathers} == {"bf16"}
    reduces = collectives(hlo, "all-reduce|reduce-scatter")
    backward = [c for c in reduces if "transpose(" in c.op]
    assert backward and {c.dtype for c in backward} == {"f32"}
    lookup = [c for c in reduces if c.op.endswith("jit(_take))/gather")]
    assert lookup and {c.dtype for c in lookup} == {"bf16"}
    assert [c for c in reduces if c.dtype == "bf16" and c not in lookup] == []
    backward_gathers = [c for c in collectives(hlo, "all-gather") if "transpose(" in c.op]
    assert [c for c in backward_gathers if c.dtype == "f32" and len(c.shape) > 1] == []  # 1-D: norms


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sft_step_that_skips_chunks_equals_one_device_computing_them_all(mesh_name, monkeypatch):
    # 3 supervised tokens per row of 16. With chunks of 4 tokens per row on 8 devices (32 on one), every group
    # needs 1 of its 4 chunks; the reference is one device and one chunk of every token, nothing skipped.
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 1 << 30)
    whole = single_device_step("qwen2_sft")
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 32 * 256)
    for got in (single_device_step("qwen2_sft"), step_on(MESHES[mesh_name], jax.devices(), "qwen2_sft")):
        np.testing.assert_allclose(got[0]["loss"], whole[0]["loss"], rtol=1e-5)
        assert got[0]["supervised_tokens"] == whole[0]["supervised_tokens"] == 16 * 3
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(whole[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh_name", ["fsdp8", "dp2_fsdp4"])
def test_cross_entropy_skips_chunks_by_branching_on_every_mesh(mesh_name, monkeypatch):
    # Chunks of 32 tokens, 4 per micro-batch on fsdp8 (2 per dp replica). Whether a chunk holds a supervised token
    # must be decided by a branch (an HLO conditional) around its matmuls. Under the trainer's vmap over dp
    # replicas, a branch on a per-replica value would become a select that computes both sides: the bound is a max
    # over the replicas (`replicas_max`), which every replica agrees on.
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 32 * 256)
    *_, hlo = step_on(MESHES[mesh_name], jax.devices(), "qwen2", partitioned=True)
    conditionals = [line for line in hlo.splitlines() if " conditional(" in line]
    assert len(conditionals) == 1  # the chunk loop's, in the forward of the loss's custom VJP


@pytest.mark.parametrize("mesh_name", ["fsdp8", "dp2_fsdp4"])
def test_cross_entropy_chunks_take_rows_from_every_device(mesh_name, monkeypatch):
    # Chunks of 32 tokens: a micro-batch is 8 rows x 16 tokens, so 4 chunks (fsdp8), or 2 per dp replica.
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 32 * 256)
    single = step_on(MeshConfig(), jax.devices()[:1], "qwen2")
    sharded = step_on(MESHES[mesh_name], jax.devices(), "qwen2", partitioned=True)
    np.testing.assert_allclose(sharded[0]["loss"], single[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # A chunk of contiguous tokens lies on one or two devices, and the partitioner gathered every device's hidden
    # states (and targets) onto every device to slice it out (1.5B, fsdp8: 26 GB per device per step).
    gathers = collectives(sharded[2], "all-gather")
    assert gathers  # the weights' (so the check below sees gathers at all)
    assert [c for c in gathers if "dynamic_slice" in c.op] == []
