"""Reading the YOLO layout, its error reports, and deterministic, resumable batches."""

import gc
import itertools
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from reorg_jax.data import augment, dataset, loader, prefetch, synthetic

SIZE = 64


@pytest.fixture(scope='module')
def data_yaml(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  return synthetic.write_dataset(root, num_train=10, num_val=3, image_size=SIZE, seed=1)


@pytest.fixture(scope='module')
def train(data_yaml):
  return dataset.load_dataset(data_yaml, split='train')


def _layout(root: Path, rows: dict[str, str], names=('a', 'b')) -> Path:
  """Tiny layout: one 16x24 image per entry of ``rows`` (label text, or None for no file)."""
  for stem, text in rows.items():
    (root / 'images').mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / 'images' / f'{stem}.png'), np.zeros((16, 24, 3), np.uint8))
    if text is not None:
      (root / 'labels').mkdir(exist_ok=True)
      (root / 'labels' / f'{stem}.txt').write_text(text)
  (root / 'data.yaml').write_text(f'train: images\nval: images\nnames: {list(names)}\n')
  return root / 'data.yaml'


def test_round_trip_of_the_synthetic_layout(data_yaml, train):
  val = dataset.load_dataset(data_yaml, split='val')
  assert len(train) == 10 and len(val) == 3 and train.names == synthetic.CLASS_NAMES
  assert [p.name for p in val.image_paths] == ['000010.png', '000011.png', '000012.png']
  image, labels = synthetic.make_image(1, 11, image_size=SIZE)
  np.testing.assert_array_equal(val.load_image(1), image)
  np.testing.assert_allclose(val.labels[1], labels, atol=1e-6)


def test_label_path_rule():
  assert dataset.label_path('a/images/b/images/x.jpg') == Path('a/images/b/labels/x.txt')
  assert dataset.label_path('/d/images/train/x.y.PNG') == Path('/d/labels/train/x.y.txt')
  assert dataset.label_path('d/my_images/x.png') == Path('d/my_images/x.txt')
  assert dataset.label_path('images/x.png') == Path('labels/x.txt')


def test_yaml_path_key_names_dict_and_list_files(tmp_path, caplog):
  _layout(tmp_path / 'set', {'p': '1 0.5 0.5 0.2 0.2\n', 'q': None})
  (tmp_path / 'set' / 'val.txt').write_text('images/q.png\n\n./images/p.png\nnotes.md\n')
  (tmp_path / 'cfg').mkdir()
  (tmp_path / 'cfg' / 'd.yaml').write_text(
    'path: ../set\ntrain: [images]\nval: val.txt\nnc: 2\nnames: {0: cat, 1: dog}\n'
  )
  config = dataset.read_data_config(tmp_path / 'cfg' / 'd.yaml')
  assert config.names == ('cat', 'dog') and config.num_classes == 2
  with caplog.at_level(logging.WARNING, logger='reorg_jax.data.dataset'):
    val = dataset.load_split(config.val, names=config.names)
  assert 'val.txt:4: ignoring' in caplog.text
  assert [p.name for p in val.image_paths] == ['p.png', 'q.png']
  np.testing.assert_allclose(val.labels[0], [[1, 0.5, 0.5, 0.2, 0.2]])
  assert val.labels[1].shape == (0, 5)  # No label file: no boxes.


@pytest.mark.parametrize(
  ('text', 'message'),
  [
    ('train: a\nval: b\nnc: 3\nnames: [a, b]', 'nc is 3 but names lists 2'),
    ('train: a\nval: b\nnames: {0: a, 2: b}', 'keys must be 0..1'),
    ('train: a\nval: b\nnc: 0', 'positive integer'),
    ('train: a\nval: b', 'needs nc or names'),
    ('val: x\nnames: [a]', "missing 'train'"),
    ('- a\n- b', 'must be a mapping'),
    ('train: [unclosed', r"bad.yaml:1:17: expected ',' or ']'"),
  ],
)
def test_bad_yaml_is_named(tmp_path, text, message):
  path = tmp_path / 'bad.yaml'
  path.write_text(text)
  with pytest.raises(dataset.DatasetError, match=message) as info:
    dataset.read_data_config(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize(
  ('row', 'message'),
  [
    ('0 0.5 0.5 0.2', 'expected "class cx cy w h"'),
    ('0 0.5 0.5 0.2 x', 'not a number'),
    ('0 0.5 nan 0.2 0.2', 'non-finite'),
    ('2 0.5 0.5 0.2 0.2', r'class 2 is not an integer in \[0, 2\)'),
    ('0.5 0.5 0.5 0.2 0.2', 'not an integer'),
    ('0 1.5 0.5 0.2 0.2', r'must lie in \[0, 1\]'),
    ('1 0.5 0.5 -0.2 0.2', r'must lie in \[0, 1\]'),
    ('0 0.1 0.1 0.3 0.3', 'duplicate of line 1'),
    ('1 0.5 0.5 0 0.2', r'box width or height is zero \(w 0, h 0.2\)'),
    ('1 0.5 0.5 0.2 0.0', r'box width or height is zero \(w 0.2, h 0\)'),
    ('1 0.2 0.3 0.2 0.5 0.2 0.9', r'box width or height is zero \(w 0, h 0.6\)'),  # a line
  ],
)
def test_malformed_label_rows_name_file_and_line(tmp_path, row, message):
  path = _layout(tmp_path, {'good': '1 0.5 0.5 0.5 0.5\n', 'bad': f'0 0.1 0.1 0.3 0.3\n\n{row}\n'})
  with pytest.raises(dataset.DatasetError, match=message) as info:
    dataset.load_dataset(path, split='train')
  assert f'{tmp_path / "labels" / "bad.txt"}:3:' in str(info.value)
  assert 'good.txt' not in str(info.value)


def test_every_malformed_file_is_listed_in_one_line(tmp_path):
  path = _layout(tmp_path, {'x': '0 2 0 0 0\n', 'y': '0 0 0 0\n', 'z': '1 0.5 0.5 0.1 0.1\n'})
  with pytest.raises(dataset.DatasetError, match='2 malformed label row') as info:
    dataset.load_dataset(path, split='train')
  assert 'x.txt:1' in str(info.value) and 'y.txt:1' in str(info.value)
  assert '\n' not in str(info.value)


def test_counts_of_a_split(tmp_path):
  rows = {
    'a': '0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n',
    'b': '',
    'c': None,
    'd': '1 0.5 0.5 0.2 0.2\n',
  }
  path = _layout(tmp_path, rows)
  (tmp_path / 'labels' / 'A.txt').write_text('0 0.5 0.5 0.1 0.1\n')  # names no image
  (tmp_path / 'labels' / 'notes.md').write_text('not a label file\n')
  counts = dataset.load_dataset(path, split='train').counts
  assert counts == dataset.SplitCounts(
    images=4, labelled=2, missing=1, empty=1, boxes=3, orphans=(tmp_path / 'labels' / 'A.txt',)
  )
  assert counts.line('train') == (
    'train: 4 images, 2 labelled, 1 without a label file, 1 with an empty one, 3 boxes; '
    f'1 label file(s) named after no image ({tmp_path / "labels" / "A.txt"})'
  )


def test_label_folder_matching_no_image_is_an_error(tmp_path):
  """Its images used to be trained as background, silently."""
  path = _layout(tmp_path, {'img1': None, 'img2': None})
  for stem in ('label1', 'label2'):
    (tmp_path / 'labels' / f'{stem}.txt').parent.mkdir(exist_ok=True)
    (tmp_path / 'labels' / f'{stem}.txt').write_text('0 0.5 0.5 0.1 0.1\n')
  with pytest.raises(dataset.DatasetError) as info:
    dataset.load_dataset(path, split='train')
  assert str(info.value) == (
    f"none of the 2 images of ['{tmp_path / 'images'}'] has a label file, while "
    f'{tmp_path / "labels"} holds 2 label file(s) named after no image (first: label1.txt, '
    'label2.txt): are the images and labels named alike?'
  )
  # Without any label file at all, the images are background, as upstream's loader allows.
  for stem in ('label1', 'label2'):
    (tmp_path / 'labels' / f'{stem}.txt').unlink()
  assert dataset.load_dataset(path, split='train').counts.missing == 2


def test_splits_listed_from_one_folder_are_not_each_others_orphans(tmp_path):
  path = _layout(tmp_path, {f'{i}': f'{i % 2} 0.5 0.5 0.1 0.1\n' for i in range(4)})
  (tmp_path / 'train.txt').write_text('images/0.png\nimages/1.png\n')
  (tmp_path / 'val.txt').write_text('images/2.png\nimages/3.png\n')
  path.write_text("train: train.txt\nval: val.txt\nnames: ['a', 'b']\n")
  for split in ('train', 'val'):
    counts = dataset.load_dataset(path, split=split).counts
    assert (counts.images, counts.labelled, counts.orphans) == (2, 2, ())


def test_polygon_rows_become_their_bounding_box(tmp_path):
  path = _layout(tmp_path, {'p': '1 0.1 0.2 0.5 0.2 0.3 0.6\n'})
  np.testing.assert_allclose(
    dataset.load_dataset(path, split='train').labels[0], [[1, 0.3, 0.4, 0.4, 0.4]], atol=1e-6
  )


def test_unreadable_images_are_skipped_with_a_warning_or_raise_when_strict(tmp_path, caplog):
  path = _layout(tmp_path, {'ok': '0 0.5 0.5 0.1 0.1\n', 'broken': None})
  (tmp_path / 'images' / 'broken.png').write_bytes(b'not a png')
  with caplog.at_level(logging.WARNING, logger='reorg_jax.data.dataset'):
    data = dataset.load_dataset(path, split='train')
  assert [p.name for p in data.image_paths] == ['ok.png']
  assert 'broken.png' in caplog.text
  with pytest.raises(dataset.DatasetError, match='1 unreadable image.*broken.png'):
    dataset.load_dataset(path, split='train', strict=True)


def test_missing_sources_and_images_deleted_after_the_scan(tmp_path):
  with pytest.raises(dataset.DatasetError, match='does not exist'):
    dataset.list_images([tmp_path / 'nowhere'])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(dataset.DatasetError, match='no images'):
    dataset.list_images([tmp_path / 'empty'])
  path = _layout(tmp_path / 'gone', {'a': None, 'b': None})
  data = dataset.load_dataset(path, split='train')
  (tmp_path / 'gone' / 'images' / 'b.png').unlink()
  feed = loader.BatchLoader(
    data, batch_size=2, image_size=32, max_boxes=1, seed=0, config=None, shuffle=False,
    drop_last=True,
  )  # fmt: skip
  with pytest.raises(dataset.DatasetError, match=r'cannot read image .*b\.png'):
    feed.batch(0, 0)


def _loader(data, **overrides):
  kwargs = dict(batch_size=4, image_size=SIZE, max_boxes=48, seed=3)
  kwargs.update(config=augment.AugmentConfig(), shuffle=True, drop_last=True)
  kwargs.update(overrides)
  return loader.BatchLoader(data, **kwargs)


def _assert_same(a, b):
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert (a.epoch, a.step) == (b.epoch, b.step)


def test_batches_shapes_dtypes_and_masks(train):
  feed = _loader(train)
  batch = feed.batch(0, 1)
  assert feed.steps_per_epoch == 2
  assert batch.images.shape == (4, SIZE, SIZE, 3) and batch.images.dtype == np.uint8
  assert batch.targets.boxes.shape == (4, 48, 4) and batch.targets.valid.dtype == bool
  assert batch.labels.shape[1] == 6 and batch.real.all()
  counts = np.bincount(batch.labels[:, 0].astype(int), minlength=4)
  np.testing.assert_array_equal(np.asarray(batch.targets.valid).sum(axis=1), counts)
  np.testing.assert_array_equal(batch.targets.to_yolo(), batch.labels)
  assert (batch.labels[:, 2:4] >= 0).all() and (batch.labels[:, 2:4] <= 1).all()
  assert loader.max_boxes_bound(train, augment.AugmentConfig()) == 8 * train.max_labels
  assert loader.max_boxes_bound(train, None) == train.max_labels


def test_evaluation_batches_keep_every_image_and_pad_the_last(train):
  feed = _loader(train, config=None, shuffle=False, drop_last=False, max_boxes=8)
  assert feed.steps_per_epoch == 3
  last = feed.batch(0, 2)
  np.testing.assert_array_equal(last.indices, [8, 9, -1, -1])
  assert (last.images[2:] == augment.PAD_VALUE).all() and not last.targets.valid[2:].any()
  first = feed.batch(0, 0)
  image, labels = synthetic.make_image(1, 0, image_size=SIZE)
  np.testing.assert_array_equal(first.images[0], image)  # Already square: untouched.
  np.testing.assert_allclose(first.labels[first.labels[:, 0] == 0, 1:], labels, atol=1e-6)


def test_order_is_a_function_of_seed_and_epoch(train):
  a, b = _loader(train), _loader(train)
  np.testing.assert_array_equal(a.order(4), b.order(4))
  assert sorted(a.order(4)) == list(range(10))
  assert not np.array_equal(a.order(4), a.order(5))
  assert not np.array_equal(a.order(4), _loader(train, seed=4).order(4))
  _assert_same(a.batch(2, 1), b.batch(2, 1))


def test_resume_continues_exactly(train):
  feed = _loader(train)
  full = list(itertools.islice(feed.forever(start_epoch=0), 5))
  assert [(b.epoch, b.step) for b in full] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
  resumed = list(itertools.islice(_loader(train).forever(start_epoch=1), 3))
  for a, b in zip(full[2:], resumed, strict=True):
    _assert_same(a, b)
  _assert_same(next(_loader(train).epoch(0, start_step=1)), full[1])
  with pytest.raises(IndexError, match='2 per epoch'):
    feed.batch(0, 2)


def test_threads_and_prefetch_give_the_same_batches(train):
  plain = list(_loader(train).epoch(1))
  threaded = _loader(train, num_threads=2)
  with prefetch.Prefetcher(threaded.epoch(1), buffer_size=1) as ahead:
    fetched = list(ahead)
  threaded.close()
  assert len(fetched) == len(plain) == 2
  for a, b in zip(plain, fetched, strict=True):
    _assert_same(a, b)


def test_worker_processes_give_the_same_batches(train):
  """Samples built in spawned worker processes equal those built here, in any worker count."""
  plain = [_loader(train).batch(epoch, step) for epoch, step in ((0, 0), (3, 1))]
  for workers in (1, 3):
    with _loader(train, num_workers=workers) as pooled:
      for want in plain:
        _assert_same(pooled.batch(want.epoch, want.step), want)


def test_worker_failures_name_the_image(tmp_path):
  data_yaml = synthetic.write_dataset(tmp_path, num_train=4, num_val=1, image_size=SIZE, seed=2)
  data = dataset.load_dataset(data_yaml, split='train')
  broken = dataset.YoloDataset(
    image_paths=data.image_paths,
    labels=(data.labels[0][:, :4],) + data.labels[1:],
    names=data.names,
  )  # rows of 4 columns: building the sample fails inside the worker
  with _loader(broken, num_workers=1, shuffle=False) as feed:
    with pytest.raises(RuntimeError, match=r'loading .*000000\.png \(index 0, epoch 0\) failed'):
      feed.batch(0, 0)


@pytest.mark.parametrize('drop_last', [True, False])
def test_shards_stack_to_the_global_batch(train, drop_last):
  """Each shard builds only its rows; stacked in shard order they are the whole batch."""
  config = augment.AugmentConfig() if drop_last else None
  whole = _loader(train, config=config, drop_last=drop_last)
  shards = [
    _loader(train, config=config, drop_last=drop_last, shard_index=i, shard_count=2)
    for i in range(2)
  ]
  assert shards[0].steps_per_epoch == whole.steps_per_epoch and shards[0].shard_size == 2
  for step in range(whole.steps_per_epoch):
    want = whole.batch(1, step)
    parts = [shard.batch(1, step) for shard in shards]
    np.testing.assert_array_equal(np.concatenate([b.images for b in parts]), want.images)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in parts]), want.indices)
    for field in ('boxes', 'classes', 'valid'):
      np.testing.assert_array_equal(
        np.concatenate([np.asarray(getattr(b.targets, field)) for b in parts]),
        np.asarray(getattr(want.targets, field)),
        err_msg=field,
      )
    relabelled = np.concatenate(
      [b.labels + np.array([2 * i, 0, 0, 0, 0, 0], np.float32) for i, b in enumerate(parts)]
    )
    np.testing.assert_array_equal(relabelled, want.labels)


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'shard_index': 2, 'shard_count': 2}, r'shard_index 2 is not in \[0, 2\)'),
    ({'shard_count': 3}, 'batch_size 4 does not split into 3 shards'),
    ({'num_workers': 2, 'num_threads': 2}, 'use one of them'),
    ({'num_workers': -1}, 'num_workers must be >= 0'),
  ],
)
def test_bad_shards_and_workers_are_named(train, overrides, message):
  with pytest.raises(ValueError, match=message):
    _loader(train, **overrides)


def test_prefetcher_reraises_and_stops_early():
  def items():
    yield 1
    raise KeyError('boom')

  ahead = prefetch.Prefetcher(items())
  assert next(ahead) == 1
  with pytest.raises(KeyError, match='boom'):
    next(ahead)
  endless = prefetch.Prefetcher(iter(int, 1), buffer_size=2)  # Never ends by itself.
  assert next(endless) == 0
  endless.close()
  assert list(endless) == []
  abandoned = prefetch.Prefetcher(iter(int, 1), buffer_size=1)
  thread = abandoned._thread
  del abandoned
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()


def test_loading_failures_name_the_image(train, monkeypatch):
  def broken(*args, **kwargs):
    raise MemoryError('no room')

  monkeypatch.setattr(augment, 'fit_long_side', broken)
  with pytest.raises(RuntimeError, match=r'loading .*\.png \(index \d+, epoch 0\) failed'):
    _loader(train).batch(0, 0)


def test_single_image_branch(train):
  config = augment.AugmentConfig(mosaic=0.0, fliplr=1.0, degrees=10.0)
  batch = _loader(train, config=config, max_boxes=loader.max_boxes_bound(train, config)).batch(0, 0)
  assert batch.targets.valid.shape == (4, train.max_labels)
  assert (batch.labels[:, 2:] >= 0).all() and (batch.labels[:, 2:] <= 1).all()


def test_too_small_max_boxes_names_the_batch_and_files(train):
  feed = _loader(train, max_boxes=1, config=None, shuffle=False)
  busiest = int(np.argmax([len(x) for x in train.labels]))
  with pytest.raises(ValueError, match='raise max_boxes') as info:
    feed.batch(0, busiest // 4)
  assert train.image_paths[busiest].name in str(info.value)


def test_bad_loader_arguments(train):
  with pytest.raises(ValueError, match='no batches'):
    _loader(train, batch_size=11)
  with pytest.raises(ValueError, match='must be >= 1'):
    _loader(train, batch_size=0)


def test_copied_layout_reads_the_same(data_yaml, train, tmp_path):
  shutil.copytree(data_yaml.parent, tmp_path / 'copy')
  again = dataset.load_dataset(tmp_path / 'copy' / 'data.yaml', split='train')
  for a, b in zip(train.labels, again.labels, strict=True):
    np.testing.assert_array_equal(a, b)
  _assert_same(_loader(train).batch(3, 0), _loader(again).batch(3, 0))
