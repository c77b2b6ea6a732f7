"""Test setup: 8 simulated CPU devices (set before jax is imported) and the shared data root."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("SID_DATA_ROOT", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

import pytest  # noqa: E402

from sid.paths import data_root  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The real public data beside the repo (../shared/data, or $SID_DATA_ROOT)."""
    root = data_root()
    assert root.is_dir(), f"data root {root} not found: set SID_DATA_ROOT"
    return root
