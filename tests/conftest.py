"""Session settings, set before anything imports JAX (child processes inherit them through the environment):

- offline: reference models are built from local configs, never fetched from a hub;
- XLA:CPU compiles with its backend optimisation off (`FAST_COMPILE`): on two cores most of a test's
  time is compiling, not running, small programs; set SDXL_JAX_TEST_FULL_OPT=1 to test fully optimised code;
- PyTorch (the parity tests' reference) on one thread: with two test workers on two cores, its
  per-op thread pools wait on each other and a tiny UNet's forward takes seconds instead of milliseconds;
- one persistent compilation cache for the session (in-process tests and children share it), so a
  program compiled twice, in two processes or by two `jit`s of the same function, compiles once.
"""

import os
import shutil
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not os.environ.get("SDXL_JAX_TEST_FULL_OPT"):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="sdxl_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if "_CACHE" in globals():
        shutil.rmtree(_CACHE, ignore_errors=True)
