"""Test setup: 8 simulated CPU devices (set before jax is imported) and the shared data root.

`SID_TEST_DEVICE=gpu` (`make test-gpu`) leaves the platform and the devices alone, for the tests marked `gpu`, and
stops at once if JAX finds no GPU there (a GPU run that skips its GPU tests would pass without testing anything).
"""

import os

GPU_RUN = os.environ.get("SID_TEST_DEVICE") == "gpu"
if not GPU_RUN:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
os.environ.setdefault("SID_DATA_ROOT", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

import pytest  # noqa: E402

from sid.paths import data_root  # noqa: E402


def pytest_configure(config):
    if GPU_RUN:
        import jax

        if jax.default_backend() != "gpu":
            pytest.exit(
                f"SID_TEST_DEVICE=gpu but JAX's backend is {jax.default_backend()!r}: no GPU here", returncode=4
            )


@pytest.fixture(scope="session")
def shared_data():
    """The real public data beside the repo (../shared/data, or $SID_DATA_ROOT)."""
    root = data_root()
    assert root.is_dir(), f"data root {root} not found: set SID_DATA_ROOT"
    return root
