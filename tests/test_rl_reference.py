"""The RL reference model (`sid.rl.reference.Reference`): frozen, copied or alpha-mixed every N steps against a
float64 oracle, each sync saved, and a resumed run given back the reference of its step."""

import logging
import shutil

import equinox as eqx
import jax
import numpy as np
import pytest
from tiny import tiny_qwen2

from sid.config import MeshConfig
from sid.models.qwen2 import Qwen2
from sid.parallel.mesh import make_mesh
from sid.rl.config import RLConfig
from sid.rl.reference import REFERENCE_DIR, Reference

MESH = MeshConfig(dp=1, fsdp=2)


def model(seed: int) -> Qwen2:
    return eqx.filter_jit(Qwen2.init)(tiny_qwen2(), key=jax.random.key(seed))


def leaves(m) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(eqx.filter(m, eqx.is_array))]


def assert_same(a, b) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def mixed(alpha: float, policy, reference) -> list[np.ndarray]:
    return [alpha * p + (1 - alpha) * r for p, r in zip(leaves(policy), leaves(reference), strict=True)]


def assert_close(m, want: list[np.ndarray]) -> None:
    for got, w in zip(leaves(m), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def policies():
    return [model(seed) for seed in range(6)]  # the policy after 0..5 steps


def test_a_frozen_reference_is_the_start_and_saves_nothing(policies, tmp_path):
    ref = Reference(policies[0], RLConfig(ref_sync_every=0), make_mesh(MESH), tmp_path)
    for step in range(5):
        assert_same(ref.at(step, policies[step]), policies[0])
    assert not (tmp_path / REFERENCE_DIR).exists()


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_syncs_mix_the_policy_in_and_a_resume_gets_its_steps_reference(policies, tmp_path, alpha, caplog):
    mesh, cfg = make_mesh(MESH), RLConfig(ref_sync_every=2, ref_sync_alpha=alpha)
    ref = Reference(policies[0], cfg, mesh, tmp_path)
    got = {step: ref.at(step, policies[step]) for step in range(6)}
    want2 = mixed(alpha, policies[2], policies[0])
    want4 = [alpha * p + (1 - alpha) * r for p, r in zip(leaves(policies[4]), want2, strict=True)]
    assert_same(got[0], policies[0])
    assert_same(got[1], policies[0])
    for step, want in [(2, want2), (3, want2), (4, want4), (5, want4)]:
        assert_close(got[step], want)
    ref.close()
    assert sorted(int(p.name) for p in (tmp_path / REFERENCE_DIR).iterdir()) == [2, 4]

    for step in (3, 4, 5):  # between syncs: the saved one; at a sync: the saved one too (it was made before)
        resumed = Reference(policies[0], cfg, mesh, tmp_path)
        resumed.resumed()
        assert_same(resumed.at(step, policies[step]), got[step])
        resumed.close()

    # The saved references gone: at a sync, the reference is re-made exactly when it needs no saved one (the first
    # sync mixes into the starting model; alpha 1 copies the policy); otherwise it restarts from the resumed
    # policy, with a warning.
    caplog.set_level(logging.WARNING, logger="sid")
    exact = {2: True, 3: False, 4: alpha == 1.0}
    for step, is_exact in exact.items():
        shutil.rmtree(tmp_path / REFERENCE_DIR)  # a re-made sync is saved again: each case starts with none
        caplog.clear()
        resumed = Reference(policies[0], cfg, mesh, tmp_path)
        resumed.resumed()
        assert_same(resumed.at(step, policies[step]), got[step] if is_exact else policies[step])
        assert ("the reference of step" in caplog.text) != is_exact, step
        resumed.close()
