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
# No persistent compilation cache (sid's runs turn one on, sid.compile_cache), here or in the processes tests start:
# tests read the HLO XLA writes while it compiles (sid.hlo), which a cache hit skips, and a test never touches the
# user's cache. tests/test_compile_cache.py turns it on in its own processes.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)  # in case jax was imported before this file set it

from sid.paths import data_root  # noqa: E402

# Every test runs under strict dtype promotion (no implicit bf16 + f32, int + float: each mix is an explicit cast in
# our code), except the test modules below, whose code reaches library code that relies on implicit promotion:
# - optax's Adam: `optax.tree_utils.tree_bias_correction` computes `1 - decay**count` with the int32 step count
#   (scale_by_adam, hence every optimizer here: AdamW, and the Muons' AdamW branch);
# - `jax.nn.dot_product_attention`'s XLA implementation in bfloat16: it promotes the logits with float32, in the
#   forward (sid.models.qwen2 wraps that call in standard promotion) and in its backward, which no wrapper reaches.
STANDARD_PROMOTION = {
    "test_optim": "optax Adam",
    "test_trainer": "optax Adam, bf16 attention backward",
    "test_mesh": "optax Adam, bf16 attention backward",
    "test_train_smoke": "optax Adam (training in process)",
    "test_train_cli": "optax Adam (training in process)",
    "test_nanogpt_cli": "optax Adam (training in process)",
    "test_compare_e2e": "optax Adam (training in process)",
    "test_bench": "optax Adam (benchmarks' train steps)",
    "test_ops": "optax Adam (training in process)",
    "test_multiprocess": "optax Adam (training in process)",
    "test_selection": "optax Adam (training in process)",
    "test_reliability": "optax Adam (training in process)",
    "test_index": "optax Adam (the RQ-VAE)",
    "test_rl_cli": "optax Adam (training in process)",
}


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


@pytest.fixture(autouse=True)
def dtype_promotion(request):
    """Strict dtype promotion for the test, unless its module is in STANDARD_PROMOTION."""
    module = request.module.__name__.rpartition(".")[2]
    with jax.numpy_dtype_promotion("standard" if module in STANDARD_PROMOTION else "strict"):
        yield
