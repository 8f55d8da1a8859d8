"""Two processes on one machine train exactly as one process with two devices.

``python -m train --distributed --coordinator 127.0.0.1:PORT --num-processes 2
--process-id I`` is started twice (one CPU device each, gloo collectives): 2
steps, then a resume from their checkpoint to the end of the second epoch.
The reference is one process with two simulated devices
(``--xla_force_host_platform_device_count=2``) running the same 4 steps in
one go. Losses, validation metrics and the final weights must agree, and
only process 0 may print or write tables. Also: 8 simulated devices in one
process (one image each) take the reference's steps. Ports are picked free; every
process is killed when the test ends, passed or not. The model is a P6
network of a few convolutions (:data:`MICRO`), which compiles quickly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import benchmark_scripts
import jax
import numpy as np
import pytest
import yaml

from reorg_jax.data import synthetic
from reorg_jax.program import config as config_lib
from reorg_jax.program import loop, report
from reorg_jax.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # per launch; compiling takes most of it on 2 cores

# What is tested is how the processes share the work, not the network: a P6 model of a
# few convolutions (ReOrg stem, strides 8 to 64, IAuxDetect over four levels) compiles in
# a fraction of p6_nano's time.
MICRO = {
  'nc': 6,
  'depth_multiple': 1.0,
  'width_multiple': 1.0,
  'anchors': [
    [19, 27, 44, 40, 38, 94],
    [96, 68, 86, 152, 180, 137],
    [140, 301, 303, 264, 238, 542],
    [436, 615, 739, 380, 925, 792],
  ],
  'backbone': [
    [-1, 1, 'ReOrg', []],
    [-1, 1, 'Conv', [8, 3, 2]],  # stride 4
    [-1, 1, 'Conv', [16, 3, 2]],  # 2: stride 8
    [-1, 1, 'Conv', [16, 3, 2]],  # 3: stride 16
    [-1, 1, 'Conv', [16, 3, 2]],  # 4: stride 32
    [-1, 1, 'Conv', [16, 3, 2]],  # 5: stride 64
  ],
  'head': [
    [2, 1, 'Conv', [8, 1, 1]],  # 6-9: lead branches
    [3, 1, 'Conv', [8, 1, 1]],
    [4, 1, 'Conv', [8, 1, 1]],
    [5, 1, 'Conv', [8, 1, 1]],
    [[6, 7, 8, 9, 2, 3, 4, 5], 1, 'IAuxDetect', ['nc', 'anchors']],  # aux: the backbone
  ],
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """``(base, config_file, reference, two, outputs)``: the reference and the two-process run."""
  base = tmp_path_factory.mktemp('distributed')
  data = synthetic.write_dataset(base / 'data', num_train=16, num_val=4, image_size=64, seed=0)
  micro = base / 'micro.yaml'
  micro.write_text(yaml.safe_dump(MICRO))
  options = {
    'data': {'yaml': str(data)},
    'model': {'name': str(micro)},
    # A batch of 8: one image per device of the 8-device run, 4 per process of the others.
    'train': {'epochs': 2, 'batch_size': 8, 'image_size': 64, 'loader_threads': 1},
    'eval': {'batch_size': 8, 'max_detections': 100, 'max_candidates': 200},
    'augment': {'enabled': False},
    'recipe': {'lr0': 0.04, 'warmup_epochs': 0.0, 'min_warmup_steps': 2},
    'loss': benchmark_scripts.FLAT_LOSS,  # the sharing is tested, not the loss's branches
    'checkpoint': {'save_every': 2, 'keep_last': 2},
    'log': {'progress': False, 'plots': False, 'tensorboard': True},
  }
  config_file = base / 'tiny.yaml'
  config_file.write_text(yaml.safe_dump(options))
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(base / 'cache'))
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  command = [sys.executable, '-m', 'train', '--config', str(config_file)]

  reference = base / 'reference'
  _one_process([*command, '--workdir', str(reference)], env=env, devices=2)

  two = base / 'two'
  outputs = [
    _two_processes(
      [*command, '--workdir', str(two), '--steps', '2'], env=env, logs=base / 'logs' / 'first'
    ),
    _two_processes(
      [*command, '--workdir', str(two), '--resume'], env=env, logs=base / 'logs' / 'resume'
    ),
  ]
  return base, config_file, reference, two, outputs


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def _one_process(command: list[str], *, env: dict[str, str], devices: int) -> None:
  """Runs ``command`` as one process with ``devices`` simulated CPU devices; checks it ran."""
  flags = env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
  done = subprocess.run(
    command,
    cwd=ROOT,
    env=dict(env, XLA_FLAGS=flags),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'{devices} cpu device(s)' in done.stdout


def _two_processes(command: list[str], *, env: dict[str, str], logs: Path) -> list[str]:
  """Runs ``command`` as processes 0 and 1 of one run; returns their stdouts.

  Each process writes to its own files under ``logs``: a pipe that nobody
  reads while the test waits on the other process would fill and stall the
  process writing to it (and then the other, at its next collective).
  """
  address = f'127.0.0.1:{_free_port()}'
  distributed = ['--distributed', '--coordinator', address, '--num-processes', '2']
  logs.mkdir(parents=True)
  processes: list[subprocess.Popen] = []
  try:
    for index in range(2):
      with (
        open(logs / f'{index}.out', 'w') as out,
        open(logs / f'{index}.err', 'w') as err,
      ):
        processes.append(
          subprocess.Popen(
            [*command, *distributed, '--process-id', str(index)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    for process in processes:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  codes = [process.returncode for process in processes]
  assert codes == [0, 0], (
    '\n'.join(  # both sides: one's failure is often the other's cause
      f'process {index} (exit {code}): {(logs / f"{index}.err").read_text()[-2500:]}'
      for index, code in enumerate(codes)
    )
  )
  return [(logs / f'{index}.out').read_text() for index in range(2)]


def test_two_processes_train_as_one_with_two_devices(runs):
  _, _, reference, two, _ = runs
  steps, expected = report.read_rows(two / 'steps.csv'), report.read_rows(reference / 'steps.csv')
  assert [r['step'] for r in steps] == [0, 1, 2, 3]
  for column in ('loss', 'box', 'obj', 'cls', 'lr'):
    np.testing.assert_allclose(
      [r[column] for r in steps], [r[column] for r in expected], rtol=1e-6, err_msg=column
    )
  epochs = report.read_rows(two / 'results.csv')
  assert [r['epoch'] for r in epochs] == [0, 1]
  for column in ('precision', 'recall', 'map50', 'map50_95'):
    np.testing.assert_allclose(
      [r[column] for r in epochs],
      [r[column] for r in report.read_rows(reference / 'results.csv')],
      atol=1e-6,
      err_msg=column,
    )


def test_checkpoints_of_both_processes_resume_to_the_same_weights(runs):
  _, config_file, reference, two, _ = runs
  config = config_lib.load(config_path=config_file, overrides={})
  pieces = loop.setup(config, data_path=Path(config.data.yaml))
  pieces.close()
  restored = []
  for workdir in (reference, two):
    with checkpoint.Checkpoints(workdir / 'checkpoints', save_every=2, read_only=True) as ckpt:
      latest = ckpt.restore_latest(like=pieces.state)
    assert latest is not None and latest.step == 4
    restored.append(jax.tree.leaves(latest.state))
  want, got = restored
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)


def test_only_process_zero_prints_and_writes(runs):
  _, _, _, two, outputs = runs
  (first_0, first_1), (resumed_0, resumed_1) = outputs
  assert 'epoch 1/2' in first_0 and 'done: 2 steps' in first_0
  assert 'resumed at step 2' in resumed_0 and 'epoch 2/2' in resumed_0
  for quiet in (first_1, resumed_1):
    assert 'epoch' not in quiet and 'done:' not in quiet and 'training' not in quiet
  assert len(list((two / 'tensorboard').glob('events.out.tfevents.*'))) == 2  # one per launch
  assert sorted(p.name for p in two.glob('run*.lock')) == ['run.0.lock', 'run.1.lock']


def test_eight_simulated_devices_match_the_reference(runs):
  """The step sharded over 8 simulated devices (one image each) is the two-device step."""
  base, config_file, reference, *_ = runs
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(base / 'cache'))
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  eight = base / 'devices8'
  command = [sys.executable, '-m', 'train', '--config', str(config_file), '--workdir', str(eight)]
  _one_process(command, env=env, devices=8)
  steps, expected = report.read_rows(eight / 'steps.csv'), report.read_rows(reference / 'steps.csv')
  assert [r['step'] for r in steps] == [0, 1, 2, 3]
  for column in ('loss', 'box', 'obj', 'cls'):
    np.testing.assert_allclose(
      [r[column] for r in steps], [r[column] for r in expected], rtol=2e-4, err_msg=column
    )
