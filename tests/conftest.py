"""Shared pytest setup: the reference implementation's torchvision stand-in,
dropping compiled code between test modules, and undoing the training
program's compilation-cache setting after each test that ran it in-process."""

import jax
import pytest

from reorg_jax.reference import oracle  # noqa: F401  (registers the torchvision stand-in before any test imports sas_yolov7)


@pytest.fixture(autouse=True, scope='module')
def _drop_compiled_code():
  """Clears JAX's compilation caches after each test module.

  Every XLA:CPU executable keeps its machine code in memory mappings until it is
  dropped. One session compiles hundreds of executables (the oracle tests alone
  leave about 22,000 mappings), and past the kernel's ``vm.max_map_count``
  (65,530 by default) the next compilation aborts the process.
  """
  yield
  jax.clear_caches()


_CACHE_OPTIONS = ('jax_compilation_cache_dir', 'jax_enable_compilation_cache')


@pytest.fixture(autouse=True)
def _restore_compile_cache():
  """Puts back the persistent-cache options ``reorg-jax train`` sets for its run."""
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  yield
  for name, value in before.items():
    if getattr(jax.config, name) != value:
      jax.config.update(name, value)
