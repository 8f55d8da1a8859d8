"""``reorg-jax detect`` against upstream's detection pipeline on the same weights and images.

The weights: upstream's ``Model`` of ``p6_nano`` with 3 named classes,
perturbed (:func:`reorg_jax.reference.models.perturbed_model`) and its head's
objectness and class biases drawn so that a few hundred boxes per image pass
the default thresholds, overlapping enough for suppression to matter; saved
as upstream's ``train_aux.py`` saves a checkpoint (half precision, with its
EMA). The source: three random images whose sizes give two input shapes at
128 px (one square, one rectangular: the letterbox pads only to the stride),
an unreadable image, a file that is not an image, and a short video.

Upstream's side is its own code: ``LoadImages`` (its letterbox), the EMA
model as ``attempt_load`` loads it (fused, in evaluation mode),
``non_max_suppression`` (with an exact greedy suppression standing in for
torchvision's, which is not installed here) and ``scale_coords``, run by
:mod:`reorg_jax.reference.detect_check`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
import torch
import yaml
from sas_yolov7.utils.general import scale_coords

from reorg_jax.models import convert, yolo
from reorg_jax.program import cli, detect_steps, detection
from reorg_jax.program.commands import detect as detect_command
from reorg_jax.reference.detect_check import (
  UpstreamInput,
  compare_detections,
  upstream_detections,
  upstream_inputs,
  upstream_nms,
)
from reorg_jax.reference.models import perturbed_model

SIZE = 128  # --img-size
STRIDE = 64  # p6_nano's largest stride
NAMES = ['cat', 'dog', 'bird']
# (name, height, width): inputs 128x128, 64x128 and (upscaled) 64x128.
IMAGES = [('a.png', 97, 131), ('b.jpg', 60, 131), ('c.png', 50, 120)]
VIDEO = 'd.mp4'
VIDEO_FRAMES = 3
CONF, IOU = 0.25, 0.45  # upstream's detect.py defaults
COMMAND = Path(sys.executable).parent / 'reorg-jax'


@dataclasses.dataclass(frozen=True)
class Scene:
  base: Path
  weights: Path
  source: Path
  cache: Path
  model: torch.nn.Module  # upstream's, as attempt_load returns it
  upstream: dict[tuple[str, int], np.ndarray]  # (file name, frame) -> [n, 6] xyxy conf cls
  inputs: dict[tuple[str, int], UpstreamInput]  # (file name, frame) -> [1, 3, h, w] input, (H, W)


def _write_checkpoint(path: Path) -> None:
  config = yolo.load_config(yolo.NANO_CONFIG)
  config['nc'] = len(NAMES)
  model = perturbed_model(config, seed=0, calibration_size=SIZE)
  head = model.model[-1]
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for conv in head.m:  # the lead convs: objectness N(-1.5, 1), classes N(1, 1)
      bias = conv.bias.view(head.na, head.no)
      bias[:, 4] = torch.randn(head.na, generator=generator) - 1.5
      bias[:, 5:] = torch.randn(head.na, head.no - 5, generator=generator) + 1.0
  model.names = list(NAMES)
  ema = copy.deepcopy(model).half()
  for parameter in ema.parameters():  # as upstream's ModelEMA keeps them
    parameter.requires_grad_(False)
  torch.save(
    {
      'epoch': 9,
      'best_fitness': np.array([0.1]),
      'training_results': None,
      'model': copy.deepcopy(model).half(),
      'ema': ema,
      'updates': 10,
      'optimizer': None,
      'wandb_id': None,
    },
    path,
  )


def _write_source(source: Path, rng: np.random.Generator) -> None:
  source.mkdir()
  for name, height, width in IMAGES:
    # Smooth random shapes: blurred noise, so resizing changes the pixels gradually.
    noise = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    assert cv2.imwrite(str(source / name), image)
  (source / 'broken.jpg').write_bytes(b'not an image')
  (source / 'notes.txt').write_text('not an image either')
  writer = cv2.VideoWriter(str(source / VIDEO), cv2.VideoWriter_fourcc(*'mp4v'), 5, (130, 60))
  for _ in range(VIDEO_FRAMES):
    writer.write(rng.integers(0, 256, (60, 130, 3), dtype=np.uint8))
  writer.release()


@pytest.fixture(scope='module')
def scene(tmp_path_factory) -> Scene:
  base = tmp_path_factory.mktemp('detect')
  weights, source = base / 'nano3.pt', base / 'source'
  _write_checkpoint(weights)
  _write_source(source, np.random.default_rng(0))
  # Upstream's attempt_load: the EMA entry in float32, fused, in evaluation mode.
  model = torch.load(weights, weights_only=False)['ema'].float().fuse().eval()
  sources = [source / name for name, _, _ in IMAGES] + [source / VIDEO]
  inputs = upstream_inputs(sources, image_size=SIZE, stride=STRIDE)
  upstream = upstream_detections(model, inputs, conf_thres=CONF, iou_thres=IOU)
  return Scene(
    base=base,
    weights=weights,
    source=source,
    cache=base / 'jax-cache',
    model=model,
    upstream=upstream,
    inputs=inputs,
  )


def _detect(scene: Scene, workdir: Path, *flags: str) -> int:
  return cli.main(
    [
      'detect',
      '--weights',
      str(scene.weights),
      '--img-size',
      str(SIZE),
      '--workdir',
      str(workdir),
      '--compile-cache',
      str(scene.cache),
      *flags,
    ]
  )


def _one_line_error(capsys) -> str:
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
  return lines[0]


def _by_item(workdir: Path) -> dict[tuple[str, int], dict]:
  document = json.loads((workdir / 'detections.json').read_text())
  return {(Path(r['file']).name, r['frame'] or 0): r for r in document['images']}


def test_detect_gives_upstreams_boxes(scene, capsys):
  workdir = scene.base / 'out'
  assert _detect(scene, workdir, '--source', str(scene.source), '--save-txt', '--save-conf') == 0
  captured = capsys.readouterr()
  (warning,) = captured.err.splitlines()  # the unreadable image, named; the rest processed
  assert warning.startswith('warning: skipped 1 image that') and 'broken.jpg' in warning

  items = _by_item(workdir)
  assert sorted(items) == sorted(scene.upstream)  # 3 images, 3 frames; not notes.txt
  assert {tuple(r['input']) for r in items.values()} == {(128, 128), (64, 128)}
  box_error = score_error = 0.0
  for key, theirs in scene.upstream.items():
    assert len(theirs) > 5, key  # suppression had work to do
    boxes, scores = compare_detections(items[key], theirs)
    box_error, score_error = max(box_error, boxes), max(score_error, scores)
  assert box_error < 1.0 and score_error < 1e-4
  print(f'largest differences from upstream: box {box_error:.2e} px, score {score_error:.2e}')

  # Upstream's label lines: from the boxes rounded to pixels, lowest score first.
  for (name, frame), theirs in scene.upstream.items():
    stem = Path(name).stem + (f'_{frame}' if frame else '')
    lines = (workdir / 'labels' / f'{stem}.txt').read_text().splitlines()
    height, width = items[(name, frame)]['height'], items[(name, frame)]['width']
    rounded = np.round(theirs[::-1, :4])
    xywh = np.concatenate(
      [(rounded[:, :2] + rounded[:, 2:]) / 2, rounded[:, 2:] - rounded[:, :2]], 1
    )
    expected = np.concatenate(
      [theirs[::-1, 5:6], xywh / [width, height, width, height], theirs[::-1, 4:5]], 1
    )
    values = np.array([[float(v) for v in line.split()] for line in lines])
    for line, row in zip(lines, values, strict=True):
      assert line == ('%g ' * 6).rstrip() % (int(row[0]), *row[1:])
    np.testing.assert_array_equal(values[:, 0], expected[:, 0])
    np.testing.assert_allclose(values[:, 1:5], expected[:, 1:5], atol=1.01 / min(width, height))
    np.testing.assert_allclose(values[:, 5], expected[:, 5], atol=1e-4)

  # The drawn images and the video, under the sources' names; nothing partial left.
  for name, height, width in IMAGES:
    drawn, original = cv2.imread(str(workdir / name)), cv2.imread(str(scene.source / name))
    assert drawn.shape == (height, width, 3) and (drawn != original).any()
  capture = cv2.VideoCapture(str(workdir / VIDEO))
  assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == VIDEO_FRAMES
  capture.release()
  assert not [p for p in workdir.rglob('*') if 'partial' in p.name]

  # --classes before suppression and names from --data; --nosave writes the JSON alone.
  data = scene.base / 'names.yaml'
  data.write_text(yaml.safe_dump({'train': 'x', 'val': 'x', 'names': ['A', 'B', 'C']}))
  only = scene.base / 'only'
  flags = ('--source', str(scene.source / 'a.png'), '--classes', '0', '2', '--nosave')
  assert _detect(scene, only, *flags, '--data', str(data)) == 0
  assert sorted(p.name for p in only.iterdir()) == ['detections.json']
  ((key, record),) = _by_item(only).items()
  theirs = upstream_detections(
    scene.model, {key: scene.inputs[key]}, conf_thres=CONF, iou_thres=IOU, classes=[0, 2]
  )[key]
  assert 0 < len(theirs) < len(scene.upstream[key])
  boxes, scores = compare_detections(record, theirs)
  assert boxes < 1.0 and scores < 1e-4
  assert {d['name'] for d in record['detections']} <= {'A', 'C'}


def test_selection_is_upstreams_nms(scene):
  """Our selection on our decoded outputs against upstream's on its own, option by option."""
  arguments = dict(
    weights=scene.weights,
    source=scene.source / 'a.png',
    data=None,
    model=None,
    image_size=SIZE,
    classes=None,
    workdir=scene.base / 'unused',
    writes_files=False,
  )
  plan = detection.prepare(**arguments)
  assert plan.names == tuple(NAMES)
  # The same tensors as a plain state_dict: the class count from the head, indices for names.
  state_file = scene.base / 'state_dict.pt'
  convert.save_torch_state_dict(plan.weights.state_dict, state_file)
  plain = detection.prepare(**{**arguments, 'weights': state_file, 'model': 'p6_nano'})
  assert plain.names == ('0', '1', '2') and plain.model.num_classes == len(NAMES)
  assert jax.tree.all(jax.tree.map(np.array_equal, plain.variables, plan.variables))
  image = cv2.cvtColor(cv2.imread(str(scene.source / 'a.png')), cv2.COLOR_BGR2RGB)
  decoded = detect_steps.decode(
    plan.model, plan.variables, detect_steps.letterbox(image, size=SIZE, stride=STRIDE)[None]
  )
  x = scene.inputs[('a.png', 0)].x
  with torch.no_grad():
    prediction = scene.model(x)[0]
  np.testing.assert_allclose(np.asarray(decoded), prediction.numpy(), rtol=1e-4, atol=1e-3)
  base = dict(
    score_threshold=CONF,
    iou_threshold=IOU,
    max_detections=300,
    max_candidates=8192,
    classes=None,
    class_agnostic=False,
  )
  full = upstream_nms(prediction, conf_thres=CONF, iou_thres=IOU)
  scores = (prediction[0, :, 5:] * prediction[0, :, 4:5]).max(1).values  # [R]
  passed = (prediction[0, :, 4] > CONF) & (scores > CONF)
  ranked = torch.sort(scores[passed], descending=True).values  # the candidates' scores
  # Suppressing the 8 best candidates keeps fewer than `few`: with max_det `few` and 8
  # candidates entering first, the selection must take more of them to give upstream's.
  few = len(full[full[:, 4] >= ranked[7].item()]) + 1
  assert few <= 8 and few < len(full)
  cases = [
    ({}, {}, None),
    ({'class_agnostic': True}, {'agnostic': True}, None),
    ({'score_threshold': 0.1, 'iou_threshold': 0.6}, {'conf_thres': 0.1, 'iou_thres': 0.6}, None),
    # Upstream keeps at most max_det of its suppression's output, best first.
    ({'max_detections': few, 'first_candidates': 8}, {}, few),
  ]
  for ours_options, theirs_options, keep in cases:
    (found,) = detect_steps.select(decoded, **{**base, **ours_options})
    theirs = upstream_nms(prediction, **{'conf_thres': CONF, 'iou_thres': IOU, **theirs_options})
    theirs = theirs[:keep]
    assert found.complete and len(theirs) > 1
    np.testing.assert_array_equal(found.classes, theirs[:, 5].astype(int))
    np.testing.assert_allclose(found.boxes, theirs[:, :4], atol=1e-2)
    np.testing.assert_allclose(found.scores, theirs[:, 4], atol=1e-4)
  assert found.candidates == int(passed.sum())

  # Past max_candidates (16), with fewer than max_det (16) kept, the selection says it may lack
  # boxes; those it has are upstream's among the 16 best candidates.
  (bounded,) = detect_steps.select(
    decoded, **{**base, 'max_candidates': 16, 'max_detections': 16, 'first_candidates': 8}
  )
  assert not bounded.complete and bounded.candidates > 16
  among = full[full[:, 4] >= ranked[15].item()]
  assert 0 < len(among) < 16
  np.testing.assert_array_equal(bounded.classes, among[:, 5].astype(int))
  np.testing.assert_allclose(bounded.scores, among[:, 4], atol=1e-4)


@pytest.mark.parametrize(
  'hw', [(97, 131), (60, 131), (50, 120), (131, 40), (128, 128), (7, 300), (300, 300), (64, 65)]
)
def test_letterbox_is_upstreams(hw):
  from sas_yolov7.utils import datasets as upstream_data

  image = np.random.default_rng(hw[0] * 1000 + hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
  ours = detect_steps.letterbox(image, size=SIZE, stride=STRIDE)
  theirs = upstream_data.letterbox(image, SIZE, stride=STRIDE)[0]
  np.testing.assert_array_equal(ours, theirs)
  assert detect_steps.input_shape(hw, size=SIZE, stride=STRIDE) == ours.shape[:2]
  boxes = np.array([[-3.0, 5.5, 40.25, 60.0], [10.0, 0.0, 127.0, 63.0]])
  expected = scale_coords(ours.shape[:2], torch.from_numpy(boxes.copy()), image.shape).numpy()
  got = detect_steps.to_original_pixels(boxes, input_hw=ours.shape[:2], original_hw=hw)
  np.testing.assert_allclose(got, expected, atol=1e-9)


def test_bad_input_is_one_line_and_writes_nothing(scene, capsys):
  base = scene.base / 'bad'
  base.mkdir()
  workdir = base / 'out'
  empty = base / 'empty'
  empty.mkdir()
  (empty / 'readme.md').write_text('no images here')
  assert _detect(scene, workdir, '--source', str(empty)) == 2
  assert 'no images' in _one_line_error(capsys)

  assert _detect(scene, workdir, '--source', str(base / 'missing')) == 2
  assert 'missing: no such file or directory' in _one_line_error(capsys)

  broken = base / 'broken'
  broken.mkdir()
  (broken / 'x.png').write_bytes(b'\x89PNG broken')
  assert _detect(scene, workdir, '--source', str(broken)) == 2
  line = _one_line_error(capsys)
  assert 'none of its 1 images could be read' in line and 'x.png' in line

  a_png = str(scene.source / 'a.png')
  assert _detect(scene, workdir, '--source', a_png, '--classes', '3') == 2
  assert '--classes [3]' in _one_line_error(capsys)
  assert _detect(scene, workdir, '--source', a_png, '--img-size', '100') == 2
  assert 'not a multiple of' in _one_line_error(capsys)
  assert _detect(scene, scene.source, '--source', str(scene.source)) == 2
  assert 'would be overwritten' in _one_line_error(capsys)
  assert not workdir.exists()

  # A video OpenCV cannot read: one line, FFmpeg's own messages included (another process).
  (base / 'junk.mp4').write_bytes(b'not a video')
  done = subprocess.run(
    [str(COMMAND), 'detect', '--weights', str(scene.weights), '--source', str(base / 'junk.mp4'),
     '--workdir', str(workdir), '--no-compile-cache'],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert done.returncode == 2
  assert done.stderr.splitlines() == [
    f'error: --source: OpenCV cannot read the video {base / "junk.mp4"}'
  ]
  assert not workdir.exists()


def test_help_names_every_option(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(['detect', '--help'])
  assert stop.value.code == 0
  text = capsys.readouterr().out
  assert detect_command.__doc__.splitlines()[0] in text
  for flag in (
    '--weights', '--source', '--data', '--model', '--cfg', '--img-size', '--conf-thres',
    '--iou-thres', '--classes', '--agnostic-nms', '--max-det', '--max-candidates', '--save-txt',
    '--save-conf', '--nosave', '--workdir', '--compile-cache', '--no-compile-cache',
  ):  # fmt: skip
    assert flag in text, flag
