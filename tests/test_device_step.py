"""``benchmarks/device_step.py --smoke``: the device benchmark runs end to end on any backend.

The small model at 64 px, batch 2, in bfloat16 (the float32 step is compiled
and run by the training tests) with the ``blocks`` rematerialisation policy
(``--remat``; ``none`` is what every other test's step runs), then upstream's
step in its own process; the table must carry a measured speed, XLA's memory
analysis and FLOP count for our row, the ratio line and the memory table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def smoke() -> str:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / 'benchmarks' / 'device_step.py'),
      '--smoke',
      '--dtypes',
      'bfloat16',
      '--remat',
      'blocks',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _rows(out: str) -> dict[tuple[str, str], list[str]]:
  header = next(i for i, line in enumerate(out.splitlines()) if line.startswith('framework'))
  rows = {}
  for line in out.splitlines()[header + 1 :]:
    cells = line.split()
    if len(cells) == 13 and cells[0] in ('ours', 'upstream'):  # not the ratio lines
      rows[(cells[0], cells[4])] = cells
  return rows


def test_our_rows_carry_speed_memory_and_flops(smoke):
  rows = _rows(smoke)
  assert ('ours', 'float32') not in rows
  for dtype in ('bfloat16',):
    cells = rows[('ours', dtype)]
    assert cells[1:4] == ['nano', '64', '2'] and cells[5] == 'blocks', cells
    rate, step, compile_s, peak, xla, tflop = cells[6:12]
    assert float(rate) > 0 and float(step) > 0 and float(compile_s) > 0, cells
    assert peak == 'n/a', cells  # a CPU reports no device memory
    assert float(xla) > 0 and float(tflop) > 0, cells


def test_upstream_runs_in_its_own_process_and_is_compared(smoke):
  rows = _rows(smoke)
  cells = rows[('upstream', 'float32')]  # no CUDA: no AMP
  assert float(cells[6]) > 0, cells
  assert 'ours bfloat16 remat blocks / upstream float32 at batch 2:' in smoke


def test_memory_table_gives_the_policy_row(smoke):
  lines = smoke.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith('XLA memory analysis'))
  (row,) = [line.split() for line in lines[header + 2 :] if line.startswith('nano')]
  assert row[:4] == ['nano', '64', '2', 'blocks'] and float(row[4]) > 0, row
  assert row[5:] == ['n/a', 'n/a'], row  # no float32 run, no mmyolo figure for this size
