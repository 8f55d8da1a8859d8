"""The README's workflow through the installed ``reorg-jax`` command: data, fine-tune, val.

One tiny chain is shared. ``data synthetic`` writes 96 px images; their labels
are then replaced by four boxes per image of random classes and places, sized
as anchors of the model. An upstream training checkpoint is written as
upstream's ``train_aux.py`` saves one (the reference package's ``Model`` with
80 classes, pickled in half precision with its EMA and optimizer), and
``train --weights`` fine-tunes it on the 6 classes with frozen layers (1 epoch
of 4 steps at 128 px), transferring exactly what upstream's
``intersect_dicts`` would. ``val`` then reproduces the run's own evaluation
from its best checkpoint: the barely trained model's detections at a low
score threshold (boxes near its anchors everywhere) match a few labels, and
the run's mAPs are small but neither 0 nor round, so they depend on every
detection. ``data``, ``train`` and one ``val`` run the console script in
their own processes; the other commands run in this process, sharing the
run's compilation cache.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import benchmark_scripts
import cv2
import numpy as np
import pytest
import torch
import yaml
from sas_yolov7.models.yolo import Model
from sas_yolov7.utils.torch_utils import intersect_dicts

from reorg_jax import boxes as box_lib
from reorg_jax import evaluate
from reorg_jax import targets as targets_lib
from reorg_jax.data import dataset, loader
from reorg_jax.models import convert, yolo
from reorg_jax.program import cli, evaluation, report, weights
from reorg_jax.program.commands import val
from reorg_jax.training import assembly, checkpoint

# Box sizes of the labels at 128 px (near anchors of p6_nano's strides 8 and 16).
BOX_SIZES = np.array([[44, 40], [38, 94], [96, 68], [19, 27]]) / 128
IMAGE_SIDE = 96  # the dataset's images
SIZE = 128  # the network input (train.image_size)
EVAL_BATCH = 4  # the run's eval.batch_size
# The run's eval.score_threshold: low enough that the untrained priors of the
# fine levels pass it.
CONF = 1e-5
METRICS = ('precision', 'recall', 'map50', 'map50_95')
COMMAND = Path(sys.executable).parent / 'reorg-jax'  # the installed console script
FROZEN = 3  # layers the fine-tuning freezes


@dataclasses.dataclass(frozen=True)
class Tiny:
  """The shared chain: dataset YAML, run directory, best checkpoint, results row, cache, the
  upstream checkpoint's model state (float32) and what ``train`` printed."""

  base: Path
  data: Path
  run: Path
  best: Path
  row: dict[str, float]
  cache: Path
  upstream: dict[str, np.ndarray]
  train_stdout: str


def _command(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run([str(COMMAND), *argv], cwd=cwd, capture_output=True, text=True, timeout=900)


def upstream_training_checkpoint(path: Path, *, num_classes: int) -> dict[str, np.ndarray]:
  """Writes ``{'model', 'ema', 'optimizer', ...}`` as ``train_aux.py`` does; the model's state."""
  torch.manual_seed(0)
  model = Model(copy.deepcopy(yolo.load_config(yolo.NANO_CONFIG)), nc=num_classes)
  sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
  sum(o.float().mean() for o in model(torch.rand(2, 3, 128, 128))).backward()
  sgd.step()  # momentum buffers in the optimizer state, as after any upstream epoch
  saved = {
    'epoch': 4,
    'best_fitness': np.array([0.25]),
    'training_results': 'epoch 4 results',
    'model': copy.deepcopy(model).half(),
    'ema': copy.deepcopy(model).half(),
    'updates': 40,
    'optimizer': sgd.state_dict(),
    'wandb_id': None,
  }
  torch.save(saved, path)
  return {k: v.float().numpy() for k, v in saved['model'].state_dict().items()}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> Tiny:
  base = tmp_path_factory.mktemp('workflow')
  data_dir, run, cache = base / 'data', base / 'run', base / 'jax-cache'
  done = _command(
    'data', 'synthetic', '--out', 'data', '--num-train', '8', '--num-val', '4',
    '--image-size', str(IMAGE_SIDE), cwd=base,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  rng = np.random.default_rng(0)
  for label in sorted((data_dir / 'labels').rglob('*.txt')):
    centres = rng.uniform(BOX_SIZES / 2, 1 - BOX_SIZES / 2)  # [4, 2]
    classes = rng.integers(0, 6, len(BOX_SIZES))
    label.write_text(
      ''.join(
        f'{c} {x:.4f} {y:.4f} {w:.4f} {h:.4f}\n'
        for c, (x, y), (w, h) in zip(classes, centres, BOX_SIZES, strict=True)
      )
    )
  upstream = upstream_training_checkpoint(base / 'nano80_training.pt', num_classes=80)
  config = base / 'tiny.yaml'
  config.write_text(
    yaml.safe_dump(
      {
        'train': {'loader_threads': 1},
        'loss': benchmark_scripts.FLAT_LOSS,
        'eval': {'batch_size': EVAL_BATCH, 'score_threshold': CONF},
        'log': {'plots': False, 'tensorboard': False, 'progress': False},
      }
    )
  )
  train = _command(
    'train', '--weights', 'nano80_training.pt', '--freeze', str(FROZEN),
    '--data', 'data/data.yaml', '--workdir', 'run', '--config', 'tiny.yaml',
    '--epochs', '1', '--batch-size', '2', '--img-size', str(SIZE), '--compile-cache', str(cache),
    cwd=base,
  )  # fmt: skip
  assert train.returncode == 0, train.stderr[-3000:]
  with (run / 'results.csv').open() as file:
    (row,) = csv.DictReader(file)  # one epoch
  (best,) = (run / 'checkpoints' / 'best').iterdir()
  assert int(best.name) == int(row['step'])
  return Tiny(
    base=base,
    data=data_dir / 'data.yaml',
    run=run,
    best=best,
    row={k: float(v) for k, v in row.items()},
    cache=cache,
    upstream=upstream,
    train_stdout=train.stdout,
  )


def _table(workdir: Path) -> dict[str, dict[str, float]]:
  """``results.csv`` of a val: class -> its row."""
  with (workdir / 'results.csv').open() as file:
    return {
      row['class']: {k: float(v) for k, v in row.items() if k != 'class'}
      for row in csv.DictReader(file)
    }


def _val(tiny: Tiny, workdir: Path, *flags: str) -> int:
  """``reorg-jax val`` in this process on the shared run's compilation cache."""
  return cli.main(['val', *flags, '--workdir', str(workdir), '--compile-cache', str(tiny.cache)])


def _val_labels(tiny: Tiny) -> dict[int, np.ndarray]:
  """The val split's labels: image id (the file stem) -> ``[N, 5]`` rows ``class cx cy w h``."""
  return {
    int(path.stem): np.loadtxt(path, ndmin=2)
    for path in sorted((tiny.data.parent / 'labels' / 'val').glob('*.txt'))
  }


def test_entry_point_reproduces_the_runs_evaluation(tiny):
  """The best checkpoint, validated at the run's own options, gives its results.csv row."""
  assert 0 < tiny.row['map50'] < 1 and 0 < tiny.row['precision'] < 1  # a test that could fail
  workdir = tiny.base / 'val-entry'
  command = [str(COMMAND)]
  # No --data or --img-size: the run's dataset and train.image_size. The run's eval
  # options: its score threshold, the default IoU and detection cap, its batch size.
  flags = ['val', '--weights', str(tiny.best), '--batch-size', str(EVAL_BATCH)]
  flags += ['--conf-thres', str(CONF), '--verbose', '--save-json']
  flags += ['--workdir', str(workdir), '--compile-cache', str(tiny.cache)]
  done = subprocess.run(command + flags, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert done.stderr == ''

  table = _table(workdir)
  for name in METRICS:
    assert table['all'][name] == pytest.approx(tiny.row[name], abs=1e-6), name
  labels = _val_labels(tiny)
  classes = np.concatenate(list(labels.values()))[:, 0].astype(int)
  assert (table['all']['images'], table['all']['labels']) == (len(labels), len(classes))

  lines = done.stdout.splitlines()
  header = lines.index(('%20s' + '%12s' * 6) % val.HEADER)
  assert lines[header] == (
    '               Class      Images      Labels           P           R      mAP@.5  mAP@.5:.95'
  )
  row = table['all']
  assert lines[header + 1] == val.ROW_FORMAT % (
    'all',
    len(labels),
    len(classes),
    *(row[k] for k in METRICS),
  )
  # --verbose: a row per class with labels, in class order (Images counts every image).
  names = dataset.read_data_config(tiny.data).names
  present = sorted(set(classes.tolist()))
  assert set(table) == {'all', *(names[c] for c in present)}
  for offset, category in enumerate(present, start=2):
    row = table[names[category]]
    count = int((classes == category).sum())
    assert row['labels'] == count
    assert lines[header + offset] == val.ROW_FORMAT % (
      names[category],
      len(labels),
      count,
      *(row[k] for k in METRICS),
    )
  speed = lines[header + 2 + len(present)]
  assert re.fullmatch(
    r'Speed: [\d.]+/[\d.]+/[\d.]+ ms inference/NMS/total per 128x128 image at batch-size 4', speed
  ), speed
  assert (workdir / 'results.txt').read_text().startswith(lines[header] + '\n')

  # The class rows average to the all row (P and R at the one shared threshold).
  for name in METRICS:
    mean = np.mean([table[names[c]][name] for c in present])
    assert mean == pytest.approx(table['all'][name], abs=1e-12), name

  # detections.json: in the 96 px images' own pixels, ids from the file stems.
  found = json.loads((workdir / 'detections.json').read_text())
  assert found and {d['image_id'] for d in found} <= set(labels)
  assert {d['category_id'] for d in found} <= set(range(len(names)))
  xywh = np.array([d['bbox'] for d in found])
  assert (xywh >= 0).all() and (xywh[:, :2] + xywh[:, 2:] <= IMAGE_SIDE + 1e-9).all()
  # The letterbox is a plain scale here (96 -> 128 px), which leaves every IoU as it
  # was: scored against the labels in the images' pixels, the file gives the table's
  # mAPs (up to the boxes' rounding to 1/1000 pixel).
  xywh_gt = [
    (image, row[0], box_lib.normalized_cxcywh_to_pixel_xywh(row[1:], width=96, height=96, xp=np))
    for image, rows in labels.items()
    for row in rows
  ]
  ground_truth = {
    'images': [{'id': image, 'height': 96, 'width': 96} for image in labels],
    'annotations': [
      {
        'id': i,
        'image_id': image,
        'category_id': int(category),
        'bbox': box.tolist(),
        'area': float(box[2] * box[3]),
        'iscrowd': 0,
      }
      for i, (image, category, box) in enumerate(xywh_gt, start=1)
    ],
    'categories': [{'id': c, 'name': n} for c, n in enumerate(names)],
  }
  scored = evaluate.coco_metrics(ground_truth, found, max_detections=300, verbose=False)
  for name in ('map50', 'map50_95'):
    assert scored[name] == pytest.approx(table['all'][name], abs=1e-5), name
  assert done.stdout.count('Average Precision') == 6 and done.stdout.count('Average Recall') == 6


def test_state_dict_file_gives_the_checkpoints_numbers(tiny, capsys):
  """The same EMA tensors as a PyTorch state_dict file (with --model) validate identically."""
  workdir = tiny.base / 'val-ckpt'
  flags = ['--data', str(tiny.data), '--batch-size', str(EVAL_BATCH), '--conf-thres', str(CONF)]
  assert _val(tiny, workdir, '--weights', str(tiny.run), *flags) == 0
  state_file = tiny.base / 'ema_state_dict.pt'
  convert.save_torch_state_dict(weights.read(tiny.best, use_ema=True).state_dict, state_file)
  capsys.readouterr()

  # Without --model the file says nothing of its architecture.
  missing = tiny.base / 'val-no-model'
  assert _val(tiny, missing, '--weights', str(state_file), *flags) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'carries no model definition: give --model' in err
  assert not missing.exists()

  other = tiny.base / 'val-state-dict'
  flags += ['--model', 'p6_nano', '--img-size', str(SIZE)]
  assert _val(tiny, other, '--weights', str(state_file), *flags) == 0
  assert _table(other) == _table(workdir)
  assert _table(workdir)['all']['map50'] == pytest.approx(tiny.row['map50'], abs=1e-6)


def _one_line_error(capsys) -> str:
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
  return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tiny, capsys):
  base = tiny.base / 'bad'
  base.mkdir()
  workdir = base / 'out'
  spec = yaml.safe_load(tiny.data.read_text())

  assert _val(tiny, workdir, '--weights', str(base / 'nope'), '--data', str(tiny.data)) == 2
  assert 'nope: no such file or directory' in _one_line_error(capsys)

  disagreeing = base / 'nc.yaml'
  disagreeing.write_text(yaml.safe_dump({**spec, 'nc': 5}))
  assert _val(tiny, workdir, '--weights', str(tiny.run), '--data', str(disagreeing)) == 2
  assert 'nc is 5 but names lists 6 classes' in _one_line_error(capsys)

  fewer = base / 'three.yaml'
  fewer.write_text(yaml.safe_dump({**spec, 'nc': 3, 'names': ['a', 'b', 'c']}))
  assert _val(tiny, workdir, '--weights', str(tiny.run), '--data', str(fewer)) == 2
  assert 'has 6 classes, --data' in _one_line_error(capsys)

  half = base / 'half.yaml'
  half.write_text(
    yolo.NANO_CONFIG.read_text().replace('width_multiple: 1.0', 'width_multiple: 0.5')
  )
  assert _val(tiny, workdir, '--weights', str(tiny.run), '--model', str(half)) == 2
  line = _one_line_error(capsys)
  assert f'does not fit {half}' in line and 'model.1.bn.bias (shape (16,) in the file, (8,)' in line

  before = (tiny.run / 'results.csv').read_text()
  assert _val(tiny, tiny.run, '--weights', str(tiny.run)) == 2
  assert 'holds a training run' in _one_line_error(capsys)
  assert (tiny.run / 'results.csv').read_text() == before

  assert _val(tiny, workdir, '--weights', str(tiny.run), '--img-size', '100') == 2
  assert 'is not a multiple of the model of --weights' in _one_line_error(capsys)
  assert not workdir.exists()

  with pytest.raises(SystemExit) as stop:
    _val(tiny, workdir, '--weights', str(tiny.run), '--max-det', '5')
  assert stop.value.code == 2
  assert '--max-det must be at least 10' in capsys.readouterr().err


def test_help_names_every_option(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(['val', '--help'])
  assert stop.value.code == 0
  text = capsys.readouterr().out
  assert val.__doc__.splitlines()[0] in text
  for flag in (
    '--weights',
    '--data',
    '--model',
    '--cfg',
    '--img-size',
    '--image-size',
    '--batch-size',
    '--conf-thres',
    '--iou-thres',
    '--max-det',
    '--max-candidates',
    '--task',
    '--verbose',
    '--save-json',
    '--workdir',
    '--compile-cache',
    '--no-compile-cache',
  ):
    assert flag in text, flag


@pytest.mark.parametrize(
  'hw', [(96, 96), (120, 200), (300, 170), (97, 131), (64, 255), (128, 40), (2, 300)]
)
def test_to_original_pixels_undoes_the_val_letterbox(tmp_path, hw):
  """Labels through the val loader and back land where they were in the image."""
  height, width = hw
  path = tmp_path / 'image.png'
  cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))
  labels = np.array([[0, 0.3, 0.6, 0.2, 0.5], [0, 0.5, 0.5, 1.0, 1.0]], np.float32)
  data = dataset.YoloDataset(image_paths=(path,), labels=(labels,), names=('a',))
  image, moved = loader.load_sample(
    data, 0, image_size=SIZE, config=None, rng=np.random.default_rng(0)
  )
  inner_w, inner_h, left, top = evaluation.letterbox_placement(hw, size=SIZE)
  assert (image[top : top + inner_h, left : left + inner_w] == 0).all()
  assert (image == 0).sum() == inner_w * inner_h * 3  # the rest is padding
  corners = box_lib.normalized_cxcywh_to_pixel_xyxy(moved[:, 1:], width=SIZE, height=SIZE, xp=np)
  back = evaluation.to_original_pixels(corners, original_hw=hw, size=SIZE)
  expected = box_lib.normalized_cxcywh_to_pixel_xyxy(
    labels[:, 1:], width=width, height=height, xp=np
  )
  np.testing.assert_allclose(back, expected, atol=1e-3)
  outside = evaluation.to_original_pixels(
    np.array([[-5.0, -5, SIZE + 5, SIZE + 5]]), original_hw=hw, size=SIZE
  )
  np.testing.assert_array_equal(outside, [[0, 0, width, height]])  # clipped to the image


def test_class_metrics_are_the_rows_of_the_all_class_numbers():
  """Per class: P and R at the shared best-F1 threshold, COCO APs; their means are the all row."""
  frame = 100
  gt_boxes = np.array([[[10, 10, 60, 60], [0, 0, 50, 50]]], np.float32)  # [B, M, 4] xyxy pixels
  gt_classes = np.array([[0, 1]])
  targets = targets_lib.Targets(
    boxes=box_lib.xyxy_to_cxcywh(gt_boxes, xp=np) / frame,
    classes=gt_classes,
    valid=np.ones((1, 2), bool),
  )
  detections = np.array(  # class 0 exact; class 1 a miss above a hit of IoU 0.82; class 2 no labels
    [[[10, 10, 60, 60], [70, 70, 90, 90], [0, 0, 50, 41], [20, 20, 30, 30]]], np.float32
  )
  scorer = evaluate.DetectionEvaluator(num_classes=3)
  scorer.add_batch(
    boxes=detections,
    scores=np.array([[0.9, 0.8, 0.6, 0.7]]),
    classes=np.array([[0, 1, 1, 2]]),
    valid=np.ones((1, 4), bool),
    targets=targets,
    image_hw=(frame, frame),
  )
  metrics, classes = evaluate.compute_by_class(scorer)
  np.testing.assert_equal(metrics, scorer.compute())  # NaN where undefined, on both
  assert list(classes) == [0, 1]  # class 2 has no labels
  assert metrics['f1_threshold'] == pytest.approx(0.6)  # mean F1 (1 + 2/3) / 2 there
  assert classes[0] == pytest.approx(
    {'labels': 1, 'precision': 1.0, 'recall': 1.0, 'map50': 1.0, 'map50_95': 1.0}
  )
  # Class 1: its hit ranks below a miss (AP 0.5) and is matched at IoU 0.50 .. 0.80.
  assert classes[1] == pytest.approx(
    {'labels': 1, 'precision': 0.5, 'recall': 1.0, 'map50': 0.5, 'map50_95': 0.35}
  )
  for name in METRICS:
    assert np.mean([row[name] for row in classes.values()]) == pytest.approx(metrics[name]), name

  # Nothing detected: P and R 0 for every class (no threshold), APs 0.
  empty = evaluate.DetectionEvaluator(num_classes=3)
  empty.add_batch(
    boxes=np.zeros((1, 1, 4)),
    scores=np.zeros((1, 1)),
    classes=np.full((1, 1), -1),
    valid=np.zeros((1, 1), bool),
    targets=targets,
    image_hw=(frame, frame),
  )
  _, none = evaluate.compute_by_class(empty)
  assert all(
    row == {'labels': 1, 'precision': 0.0, 'recall': 0.0, 'map50': 0.0, 'map50_95': 0.0}
    for row in none.values()
  )
  assert evaluate.compute_by_class(evaluate.DetectionEvaluator(num_classes=2))[1] == {}


def test_help_lists_the_commands():
  done = subprocess.run([str(COMMAND), '--help'], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0
  listed = done.stdout.split('COMMAND', 2)[-1]
  positions = [listed.index(f'    {name}') for name in ('train', 'data', 'val')]
  assert positions == sorted(positions)


def test_transfer_is_upstreams_intersection(tiny):
  raw = yolo.load_config(yolo.NANO_CONFIG)
  six = Model(copy.deepcopy(raw), nc=6).state_dict()
  expected = intersect_dicts(
    {k: torch.from_numpy(v) for k, v in tiny.upstream.items()}, six, exclude=[]
  )
  line = next(li for li in tiny.train_stdout.splitlines() if li.startswith('transferred '))
  assert line.startswith(f'transferred {len(expected)}/{len(six)} tensors from nano80_training.pt')
  # Exactly the head's class-dependent tensors are skipped: the lead and aux 1x1 convolutions
  # and the ImplicitM vectors after them (A * (5 + C) channels each).
  head = len(raw['backbone']) + len(raw['head']) - 1
  levels = len(raw['anchors'])
  dependent = {
    f'model.{head}.{part}.{i}.{leaf}'
    for i in range(levels)
    for part, leaf in (('m', 'weight'), ('m', 'bias'), ('m2', 'weight'), ('m2', 'bias'))
  } | {f'model.{head}.im.{i}.implicit' for i in range(levels)}
  assert set(six) - set(expected) == dependent
  assert f'skipped {len(dependent)}, left as initialised' in tiny.train_stdout


def test_frozen_layers_keep_the_checkpoint_weights(tiny):
  # The model pickled in the checkpoint, kept in the run directory for --resume.
  model = yolo.build_model(tiny.run / 'model.yaml', num_classes=6)
  like = assembly.state_template(model)
  with checkpoint.Checkpoints(tiny.run / 'checkpoints', save_every=1, read_only=True) as ckpt:
    restored = ckpt.restore_latest(like=like)
  assert restored is not None and restored.step == 4
  after = convert.export_state_dict(model, restored.state.variables(use_ema=False))
  frozen = [k for k in after if any(k.startswith(f'model.{i}.') for i in range(FROZEN))]
  params = [k for k in frozen if k.endswith(('.weight', '.bias', 'implicit'))]
  assert params
  for key in params:  # float16 in the file, float32 here: the same numbers
    np.testing.assert_array_equal(after[key], tiny.upstream[key], err_msg=key)
  trained = [k for k in after if k.endswith('.weight') and k not in frozen and k in tiny.upstream]
  moved = [k for k in trained if not np.array_equal(after[k], tiny.upstream[k])]
  assert len(moved) > len(trained) // 2


def test_steps_record_the_assigner(tiny):
  rows = report.read_rows(tiny.run / 'steps.csv')
  assert len(rows) == 4 and set(report.ASSIGNMENT_COLUMNS) <= set(rows[0])
  for row in rows:  # every image has four boxes, each the size of an anchor
    assert row['boxes_per_image'] == 4
    assert row['lead_positives'] > 0 and row['aux_positives'] > 0


def test_a_run_of_ours_is_weights_for_the_next(tiny):
  source = weights.read(tiny.run)  # training takes the raw model of the best checkpoint
  assert source.run == tiny.run and source.kind.startswith('checkpoint of ours at step ')
  assert isinstance(source.model_yaml, dict) and len(source.class_names) == 6
  model = yolo.build_model(source.model_yaml, num_classes=6)
  moved = weights.transfer(source, model, assembly.zero_variables(model))
  assert len(moved.transferred) == moved.total and not moved.skipped


def test_resume_needs_only_the_run_directory(tiny):
  """The run's own options (its model.yaml, frozen layers, dataset) come from its config.yaml."""
  before = yaml.safe_load((tiny.run / 'config.yaml').read_text())
  done = _command(
    'train', '--workdir', str(tiny.run), '--resume', '--compile-cache', str(tiny.cache),
    cwd=tiny.base.parent,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'done: 4 steps' in done.stdout
  after = yaml.safe_load((tiny.run / 'config.yaml').read_text())
  for section, key in (('model', 'name'), ('data', 'yaml'), ('train', 'freeze')):
    assert after[section][key] == before[section][key], key
  assert after['model']['name'] == str(tiny.run / 'model.yaml') and after['train']['freeze'] == 3
  changed = _command(
    'train', '--workdir', str(tiny.run), '--resume', '--freeze', '1', cwd=tiny.base
  )  # fmt: skip
  assert changed.returncode == 1
  assert changed.stderr.strip() == (
    f'error: cannot resume with options that change the run: train.freeze: {FROZEN} -> 1'
  )


def test_chain_exports_then_detects_and_validates_the_deploy_checkpoint(tiny):
  """Steps 5 and 6 of the README's chain, through the installed command: export the run
  (deploy, ONNX, StableHLO), then detect and validate with the deploy checkpoint."""
  done = _command(
    'export', '--weights', 'run', '--include', 'deploy,onnx,stablehlo', '--img-size', str(SIZE),
    '--platforms', 'cpu', '--workdir', 'export', cwd=tiny.base,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  written = {
    p.relative_to(tiny.base / 'export').as_posix() for p in (tiny.base / 'export').rglob('*')
  }
  assert {'deploy/model.yaml', 'deploy/weights.pt', 'model.onnx', 'model.stablehlo'} <= written

  images = tiny.data.parent / 'images' / 'val'
  done = _command(
    'detect', '--weights', 'export/deploy', '--source', str(images), '--conf-thres', str(CONF),
    '--save-txt', '--save-conf', '--nosave', '--workdir', 'detect',
    '--compile-cache', str(tiny.cache), cwd=tiny.base,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  document = json.loads((tiny.base / 'detect' / 'detections.json').read_text())
  found = {Path(entry['file']).stem: entry['detections'] for entry in document['images']}
  assert sorted(found) == sorted(p.stem for p in images.iterdir())
  assert all(found.values())  # at this threshold every image has detections
  for stem, detections in found.items():
    lines = (tiny.base / 'detect' / 'labels' / f'{stem}.txt').read_text().splitlines()
    assert len(lines) == len(detections) and all(len(li.split()) == 6 for li in lines)

  # The deploy checkpoint (implicit layers folded, aux head gone) scores as the run did.
  workdir = tiny.base / 'val-deploy'
  flags = ['--weights', str(tiny.base / 'export' / 'deploy'), '--data', str(tiny.data)]
  flags += ['--img-size', str(SIZE), '--batch-size', str(EVAL_BATCH), '--conf-thres', str(CONF)]
  assert _val(tiny, workdir, *flags) == 0
  for name in METRICS:
    assert _table(workdir)['all'][name] == pytest.approx(tiny.row[name], abs=0.01), name
