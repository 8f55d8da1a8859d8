"""``benchmarks/loss_speed.py`` at a tiny size: both workers answer, every row prints."""

import re

import benchmark_scripts


def test_prints_both_sides_ratios_and_the_fresh_write(capsys):
  module = benchmark_scripts.load('loss_speed')
  argv = ['--batch', '2', '--size', '128', '--classes', '3', '--boxes', '2', '--one-branch']
  module.main([*argv, '--rounds', '2', '--repeats', '1'])
  out = capsys.readouterr().out
  assert '; our loss with one branch (capacity_fractions=(), batch_groups=1)' in out
  number = r'([\d.]+)'
  rows = [line.split() for line in out.splitlines() if re.match(r'^\s+2  fwd(\+bwd)?  ', line)]
  # boxes, label, upstream best, its rounds (median, [range]), ours best, ours rounds, ratio, ...
  assert [row[1] for row in rows] == ['fwd', 'fwd+bwd'], out
  for row in rows:
    upstream_ms, ours_ms, ratio = float(row[2]), float(row[5]), float(row[8].rstrip('x'))
    assert upstream_ms > 0 and ours_ms > 0
    # The times are printed to 0.1 ms, the ratio of the unrounded times to 0.1.
    low, high = (upstream_ms - 0.05) / (ours_ms + 0.05), (upstream_ms + 0.05) / (ours_ms - 0.05)
    assert low - 0.05 <= ratio <= high + 0.05, row
  fresh = re.search(
    rf'fresh memory: upstream {number} ms .* \({number}k page faults\), '
    rf'ours {number} ms .* \({number}k page faults\)$',
    out,
    re.M,
  )
  assert fresh is not None, out
  faults = re.search(
    rf'page faults per fwd\+bwd call, median: upstream {number}k, ours {number}k', out
  )
  assert faults is not None, out
  # At this size the gradients fit memory the allocator reuses, so a count may be 0.
  assert all(float(x) >= 0 for x in faults.groups()), faults.group(0)
  bound = re.search(
    rf'^\s+2  fwd\+bwd if ours only .* = {number} / {number} = {number}x$', out, re.M
  )
  assert bound is not None, out
  assert float(bound.group(2)) == float(fresh.group(3))
