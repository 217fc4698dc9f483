"""Test set-up: CPU only, 4 forced host devices (for shard_map tests), persistent compile cache.

Set before any JAX op runs; the cache lives outside the repository so CI reuses it between runs.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/mocosfl_jax/jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import gc  # noqa: E402  (after the environment above, which must precede any JAX import)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops every compiled executable after each test module.

  XLA's CPU executables hold their machine code in memory mappings for as long as JAX's jit
  caches keep them, and one process running the whole suite compiles hundreds of them: it ran
  into the kernel's limit on mappings per process (vm.max_map_count, 65 530 by default), where
  compilation fails and the process dies with a segmentation fault while raising the error.
  Executables shared across modules come back from the persistent cache.
  """
  yield
  import jax
  jax.clear_caches()
  gc.collect()
