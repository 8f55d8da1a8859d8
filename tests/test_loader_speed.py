"""``benchmarks/loader_speed.py`` at a tiny size: every row and the ratio line are printed."""

import re

import benchmark_scripts


def test_prints_rates_and_ratios(capsys):
  module = benchmark_scripts.load('loader_speed')
  argv = ['--sizes', '64', '--images', '4', '--samples', '8', '--batch', '4', '--repeats', '1']
  assert module.main([*argv, '--max-workers', '2']) == 0
  out = capsys.readouterr().out
  rows = re.findall(r'^\s+64 (upstream, one core|ours, \d workers?)\s+([\d.]+)', out, re.M)
  assert [name for name, _ in rows] == ['upstream, one core', 'ours, 1 worker', 'ours, 2 workers']
  assert all(float(rate) > 0 for _, rate in rows)
  ratio = re.search(
    r'^ratio: size=64 per_worker_1_vs_upstream_core=([\d.]+) workers_2_vs_1=([\d.]+)$', out, re.M
  )
  assert ratio is not None, out
