"""Transparent huge pages for the program's large arrays: glibc's tunable, set by the program.

A training step allocates its large activations and gradients afresh on every
call. glibc serves every block over its mmap threshold (at most 32 MiB) with a
new ``mmap``, and the kernel gives the pages one 4 KiB page at a time, on
first touch: one page fault each, tens of thousands per step, much of the
step's system time. With the tunable ``glibc.malloc.hugetlb=1`` glibc asks the
kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on those blocks,
so a first touch maps 2 MiB at once.

glibc reads ``GLIBC_TUNABLES`` only when a process starts. So the program's
entry points (``reorg-jax`` and ``python -m train``) call
:func:`restart_with_huge_pages` first: where the tunable would help and is not
set, it adds it to the environment and replaces the process with the same
command (``os.execv``: the same process id, arguments and standard streams;
the cost is one more interpreter start, 0.02 s on a 2-core VM). Nothing
changes in the numbers computed, only where their memory comes from.

It does nothing when:

* ``REORG_JAX_HUGE_PAGES=0`` is set (the off switch; any other value or none
  means on);
* ``GLIBC_TUNABLES`` already names ``glibc.malloc.hugetlb`` (the user's
  choice, or the restart has happened);
* the C library is not glibc 2.35 or newer (the first with the tunable), or
  the kernel's transparent huge pages are ``never`` or absent (not Linux);
* it is called in a process that did not start as a program (a test calling
  ``cli.main([...])``): only the entry points call it.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = [
  'OFF_SWITCH',
  'THP_MODE_FILE',
  'TUNABLE',
  'program_environment',
  'restart_with_huge_pages',
  'tunables_with_huge_pages',
  'wanted',
]

TUNABLE = 'glibc.malloc.hugetlb'
OFF_SWITCH = 'REORG_JAX_HUGE_PAGES'  # '0' turns the restart off
THP_MODE_FILE = Path('/sys/kernel/mm/transparent_hugepage/enabled')
_FIRST_GLIBC = (2, 35)  # the first glibc that reads glibc.malloc.hugetlb


def _glibc_version() -> tuple[int, ...] | None:
  library, version = platform.libc_ver()
  if library != 'glibc' or not version:
    return None
  try:
    return tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return None


def _thp_mode(path: Path = THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or ``None``."""
  try:
    text = path.read_text()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1 : end] if 0 <= start < end else None


def tunables_with_huge_pages(current: str | None) -> str:
  """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added to what ``current`` sets."""
  entry = f'{TUNABLE}=1'
  return f'{current}:{entry}' if current else entry


def wanted(
  environ: Mapping[str, str],
  *,
  glibc: tuple[int, ...] | None,
  thp_mode: str | None,
) -> bool:
  """Whether a process with ``environ`` on this C library and kernel should restart.

  Args:
    environ: the process environment.
    glibc: ``(major, minor)`` of glibc, ``None`` for another C library.
    thp_mode: the kernel's transparent huge page mode, ``None`` when unknown.
  """
  if environ.get(OFF_SWITCH, '') == '0':
    return False
  if TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return False
  if glibc is None or glibc < _FIRST_GLIBC:
    return False
  return thp_mode in ('always', 'madvise')


def program_environment(environ: Mapping[str, str]) -> dict[str, str]:
  """The environment the program runs in when started with ``environ`` (after its restart).

  ``environ`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``
  where :func:`wanted` on this machine, else unchanged. Benchmarks start their
  workers in it to time our step as the program runs it.
  """
  env = dict(environ)
  if wanted(environ, glibc=_glibc_version(), thp_mode=_thp_mode()):
    env['GLIBC_TUNABLES'] = tunables_with_huge_pages(environ.get('GLIBC_TUNABLES'))
  return env


def restart_with_huge_pages() -> None:
  """Restarts this program with glibc's huge-page tunable where it helps; else returns.

  Call it first thing in a program's entry point, before work is done or
  output written (the process is replaced; nothing after the call runs in
  this one). See the module docstring for when it does nothing.
  """
  if not wanted(os.environ, glibc=_glibc_version(), thp_mode=_thp_mode()):
    return
  os.environ['GLIBC_TUNABLES'] = tunables_with_huge_pages(os.environ.get('GLIBC_TUNABLES'))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
