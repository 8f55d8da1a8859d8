"""The program restarts itself with glibc's huge-page tunable, once, unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reorg_jax.program import allocator

ROOT = Path(__file__).resolve().parents[1]
# Prints its process id, restarts as the entry points do, then prints the id and the tunables.
PROGRAM = (
  'import os\n'
  'print(os.getpid(), flush=True)\n'
  'from reorg_jax.program import allocator\n'
  'allocator.restart_with_huge_pages()\n'
  "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
)
GLIBC = allocator._glibc_version()
THP = allocator._thp_mode()


@pytest.mark.parametrize(
  ('environ', 'glibc', 'thp', 'expected'),
  [
    ({}, (2, 36), 'madvise', True),
    ({}, (2, 36), 'always', True),
    ({}, (2, 36), 'never', False),
    ({}, (2, 36), None, False),  # not Linux, or no transparent huge pages
    ({}, (2, 34), 'madvise', False),  # glibc before the tunable
    ({}, None, 'madvise', False),  # musl and others
    ({'REORG_JAX_HUGE_PAGES': '0'}, (2, 36), 'madvise', False),  # the off switch
    ({'REORG_JAX_HUGE_PAGES': '1'}, (2, 36), 'madvise', True),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, (2, 36), 'madvise', False),  # the user's
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, (2, 36), 'madvise', True),
  ],
)
def test_when_it_restarts(environ, glibc, thp, expected):
  assert allocator.wanted(environ, glibc=glibc, thp_mode=thp) is expected


def test_tunables_keep_what_was_set():
  assert allocator.tunables_with_huge_pages(None) == 'glibc.malloc.hugetlb=1'
  assert (
    allocator.tunables_with_huge_pages('glibc.malloc.arena_max=2')
    == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  )


@pytest.mark.parametrize('environ', [{}, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}])
def test_program_environment_is_the_one_after_the_restart(environ, monkeypatch):
  for thp, glibc in (('madvise', (2, 36)), ('never', (2, 36))):
    monkeypatch.setattr(allocator, '_thp_mode', lambda thp=thp: thp)
    monkeypatch.setattr(allocator, '_glibc_version', lambda glibc=glibc: glibc)
    env = allocator.program_environment({**environ, 'HOME': '/x'})
    assert env['HOME'] == '/x'
    if thp == 'madvise':
      assert env['GLIBC_TUNABLES'] == allocator.tunables_with_huge_pages(
        environ.get('GLIBC_TUNABLES')
      )
    else:
      assert env == {**environ, 'HOME': '/x'}


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  mode = tmp_path / 'enabled'
  mode.write_text('always [madvise] never\n')
  assert allocator._thp_mode(mode) == 'madvise'
  assert allocator._thp_mode(tmp_path / 'absent') is None


def _run(**environ: str) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', allocator.OFF_SWITCH)}
  env.update(environ, PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]))
  done = subprocess.run(
    [sys.executable, '-c', PROGRAM], env=env, capture_output=True, text=True, check=True
  )
  return done.stdout.split('\n')[:-1]


@pytest.mark.skipif(
  not allocator.wanted({}, glibc=GLIBC, thp_mode=THP),
  reason=f'no restart here (glibc {GLIBC}, transparent huge pages {THP})',
)
def test_the_process_restarts_once_in_place_with_the_tunable():
  first, again, last = _run(GLIBC_TUNABLES='glibc.malloc.arena_max=4')
  assert first == again  # the same process id, printed before and after the restart
  assert last == f'{first} glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1'


def test_the_off_switch_keeps_the_process_as_it_is():
  first, last = _run(REORG_JAX_HUGE_PAGES='0')
  assert last == f'{first} None'
