"""Shared pytest setup: the reference implementation's torchvision stand-in,
the longest test files first, dropping compiled code between test modules, and
undoing the training program's compilation-cache setting after each test that
ran it in-process."""

import jax
import pytest

from reorg_jax.reference import oracle  # noqa: F401  (registers the torchvision stand-in before any test imports sas_yolov7)

# The files that take longest (minutes of XLA compilation each, on 2 cores), longest first.
# pytest-xdist (``--dist loadfile``) hands whole files to its workers in collection order;
# starting with the longest keeps one worker from running a long file alone at the end.
LONGEST_FIRST = (
  'test_train.py',
  'test_distributed.py',
  'test_compact.py',
  'test_workflow.py',
  'test_models.py',
  'test_trained_step.py',
  'test_freeze.py',
  'test_remat.py',
  'test_train_vs_upstream.py',
  'training.ipynb',
  'test_verify.py',
  'test_device_step.py',
  'test_convolution.py',
  'label_assignment.ipynb',
  'test_oracle_parity.py',
  'test_slots.py',
  'test_cross_framework_step.py',
  'cross_framework.ipynb',
  'test_assignment_stats.py',
  'test_assigner.py',
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Puts the files of :data:`LONGEST_FIRST` first, in its order (a stable sort)."""
  rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
