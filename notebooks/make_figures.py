"""Writes the README's figures (PNG) into ``docs/figures/``.

Run from the repository root::

  python notebooks/make_figures.py            # all figures
  python notebooks/make_figures.py reorg      # only some: reorg, assignment, parity

The notebooks next to this script draw the same figures with the same
helpers (the ``figures`` package beside it) and explain them step by step. Every
figure is a pure function of the seeds below. Loss curves of a short run are
drawn by ``training.ipynb`` only: a few dozen CPU steps explain nothing.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import figures
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import reorg_jax
from reorg_jax.data import synthetic
from reorg_jax.models import yolo

matplotlib.use('Agg')

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / 'docs' / 'figures'

# The scene of the ReOrg and assignment figures: image 28 of synthetic seed 3, 320 px,
# shapes up to 0.6 of the side so that several levels get boxes.
SCENE_SEED, SCENE_INDEX, SCENE_SIZE, SCENE_MAX_SIZE = 3, 28, 320, 0.6
MAX_BOXES = 8
# Steps of Adam on the head outputs themselves ("sharper" lead predictions).
REFINE_STEPS = (0, 30, 150)


def scene() -> tuple[np.ndarray, np.ndarray]:
  """The demo image and its ``[N, 5]`` labels ``(class, cx, cy, w, h)``."""
  return synthetic.make_image(
    SCENE_SEED, SCENE_INDEX, image_size=SCENE_SIZE, max_size=SCENE_MAX_SIZE, min_size=0.05
  )


def scene_targets(labels: np.ndarray) -> reorg_jax.Targets:
  """The labels of one image as a batch of one."""
  rows = np.concatenate([np.zeros((len(labels), 1), np.float32), labels], axis=1)
  return reorg_jax.Targets.from_yolo(rows, 1, MAX_BOXES, num_classes=len(synthetic.CLASS_NAMES))


def nano_outputs(image: np.ndarray, *, seed: int = 0) -> list[jax.Array]:
  """The ``2L`` training-mode outputs of a freshly initialised ``p6_nano`` on ``image``."""
  model = yolo.p6_nano(num_classes=len(synthetic.CLASS_NAMES))
  x = jnp.asarray(image[None], jnp.float32) / 255.0
  variables = model.init(jax.random.key(seed), x, train=False)
  outputs, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  return list(outputs)


def assign_both(
  outputs: list[jax.Array], targets: reorg_jax.Targets, config: reorg_jax.LossConfig, hw
) -> tuple[reorg_jax.Assignment, reorg_jax.Assignment]:
  """Lead (fine) and auxiliary (coarse) assignment, both from the lead outputs."""
  lead = outputs[: config.num_levels]
  return (
    reorg_jax.assign(lead, targets, hw, config, coarse=False),
    reorg_jax.assign(lead, targets, hw, config, coarse=True),
  )


def refined_outputs(
  outputs: list[jax.Array],
  targets: reorg_jax.Targets,
  config: reorg_jax.LossConfig,
  hw: tuple[int, int],
  *,
  steps: tuple[int, ...],
  learning_rate: float = 0.05,
) -> dict[int, list[jax.Array]]:
  """Head outputs after ``steps`` Adam steps on ``aux_ota_loss`` taken on the outputs themselves.

  A cheap stand-in for training: the predictions move towards the boxes the
  way the loss pulls them, without touching any weights.
  """
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(current, state):
    grads = jax.grad(lambda o: reorg_jax.aux_ota_loss(o, targets, hw, config)[0])(current)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(current, updates), state

  current, state = list(outputs), optimizer.init(list(outputs))
  result = {}
  for done in range(max(steps) + 1):
    if done in steps:
      result[done] = current
    if done < max(steps):
      current, state = step(current, state)
  return result


def reorg_figures(out: pathlib.Path) -> None:
  """``reorg.png`` and ``reorg_channel_order.png``."""
  image, _ = scene()
  figures.save_png(figures.reorg_figure(image), out / 'reorg.png')
  figures.save_png(figures.channel_order_figure(image), out / 'reorg_channel_order.png')


def assignment_figures(out: pathlib.Path) -> None:
  """``assignment.png`` and ``assignment_change.png``."""
  image, labels = scene()
  targets = scene_targets(labels)
  config = reorg_jax.LossConfig.p6(len(synthetic.CLASS_NAMES))
  hw = image.shape[:2]
  outputs = nano_outputs(image)
  fine, coarse = assign_both(outputs, targets, config, hw)
  figure = figures.assignment_figure(
    image, targets, fine, coarse, config, class_names=synthetic.CLASS_NAMES
  )
  figures.save_png(figure, out / 'assignment.png')
  refined = refined_outputs(outputs, targets, config, hw, steps=REFINE_STEPS)
  stages = []
  for steps, current in refined.items():
    name = 'freshly initialised p6_nano' if steps == 0 else f'after {steps} steps on the outputs'
    stages.append((name, *assign_both(current, targets, config, hw)))
  figure = figures.assignment_change_figure(image, targets, stages, config)
  figures.save_png(figure, out / 'assignment_change.png')


def parity_figure(out: pathlib.Path) -> None:
  """``parity_gradients.png``: gradients of ours against upstream on a parity-test scene."""
  import torch

  from reorg_jax.reference import oracle
  from reorg_jax.testing import Scene, make_scene

  config, hw, targets, outputs = make_scene(Scene(20, 2, 320, 80, 25))
  reference = oracle.reference_loss(config)
  p = [torch.tensor(o, requires_grad=True) for o in outputs]
  loss, _ = reference(p, torch.from_numpy(targets.to_yolo()), torch.zeros(2, 3, *hw))
  loss.backward()
  grads = jax.grad(lambda o: reorg_jax.aux_ota_loss(o, targets, hw, config)[0])(
    [jnp.asarray(o) for o in outputs]
  )
  figure = figures.gradient_figure(
    [np.asarray(g) for g in grads], [x.grad.numpy() for x in p], num_levels=config.num_levels
  )
  figures.save_png(figure, out / 'parity_gradients.png')


FIGURES = {
  'reorg': reorg_figures,
  'assignment': assignment_figures,
  'parity': parity_figure,
}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('only', nargs='*', help=f'figures to write, of {", ".join(FIGURES)}')
  parser.add_argument('--out', type=pathlib.Path, default=OUT, help='output folder')
  args = parser.parse_args(argv)
  unknown = sorted(set(args.only) - set(FIGURES))
  if unknown:
    parser.error(f'unknown figures {unknown}; choose from {", ".join(FIGURES)}')
  args.out.mkdir(parents=True, exist_ok=True)
  for name in args.only or FIGURES:
    start = time.perf_counter()
    FIGURES[name](args.out)
    print(f'{name}: {time.perf_counter() - start:.1f} s')
  for path in sorted(args.out.glob('*.png')):
    print(
      f'{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size // 1024} KB'
    )


if __name__ == '__main__':
  main()
