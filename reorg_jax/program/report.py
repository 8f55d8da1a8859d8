"""What a run writes about itself: per-step and per-epoch tables, plots, TensorBoard.

Files in the run directory:

* ``steps.csv``: one row per training step (``step, epoch, loss, box, obj,
  cls, lr``, then the assigner at work: the batch's mean boxes, lead-head and
  aux-head positives per image, :data:`ASSIGNMENT_COLUMNS`), the raw
  material of the loss curves; TensorBoard gets the same scalars.
* ``results.csv``: one row per epoch (:data:`EPOCH_COLUMNS`): mean training
  losses, validation precision, recall, mAP@0.5 and mAP@0.5:0.95 with the
  EMA weights, and the learning rate.
* ``losses.png`` and ``map.png``: those columns plotted against the epoch
  (:func:`curves_figure`, which the notebooks use for per-step curves too).
* ``tensorboard/``: the same scalars as TensorBoard events.

On resume, rows past the restored position are dropped (and a row cut
short by a failed write, or repeated for the same step, is never kept), so
every table reads as if the run had never stopped.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from matplotlib.figure import Figure

__all__ = [
  'ASSIGNMENT_COLUMNS',
  'EPOCH_COLUMNS',
  'LOSS_COLUMNS',
  'STEP_COLUMNS',
  'Progress',
  'Scalars',
  'Table',
  'curves_figure',
  'plot_epochs',
  'read_rows',
]

STEP_COLUMNS = (
  'step',
  'epoch',
  'loss',
  'box',
  'obj',
  'cls',
  'lr',
  'boxes_per_image',
  'lead_positives',
  'aux_positives',
)
EPOCH_COLUMNS = (
  'epoch',
  'step',
  'loss',
  'box',
  'obj',
  'cls',
  'precision',
  'recall',
  'map50',
  'map50_95',
  'lr',
  'seconds',
)


# The loss columns of ``steps.csv`` -> the train step's metric each one records.
LOSS_COLUMNS = {'loss': 'total', 'box': 'box', 'obj': 'obj', 'cls': 'cls'}

# The assigner at work, per step: mean boxes, lead (fine) and aux (coarse) SimOTA
# positives per image of the batch (columns of ``steps.csv`` = the step's metrics).
ASSIGNMENT_COLUMNS = ('boxes_per_image', 'lead_positives', 'aux_positives')


def read_rows(path: str | os.PathLike) -> list[dict[str, float]]:
  """The rows of a CSV written by :class:`Table`, values as floats (``[]`` if missing).

  A last line without its newline (an append cut short by a full disk or a
  kill) is not a row and is left out.

  Raises:
    ValueError: any other row that is not all numbers (naming file and line).
  """
  path = Path(path)
  if not path.is_file():
    return []
  text = path.read_text()
  if text and not text.endswith('\n'):
    text = text[: text.rfind('\n') + 1]
  rows = []
  for line, row in enumerate(csv.DictReader(text.splitlines()), start=2):
    try:
      rows.append({k: float(v) for k, v in row.items()})
    except (TypeError, ValueError):
      raise ValueError(f'{path}:{line}: not a row of numbers: {row}') from None
  return rows


class Table:
  """An append-only CSV file with fixed columns.

  Args:
    path: the file.
    columns: column names, in order.
    keep_below: on opening, keep only existing rows whose ``key`` column is
      below this value (rows a resumed run will write again); ``None``
      starts a new file.
    key: the column ``keep_below`` refers to.
    writable: ``False`` keeps the rows in memory only and never touches the
      file (the processes of a multi-process run other than the first).
  """

  def __init__(
    self,
    path: str | os.PathLike,
    *,
    columns: tuple[str, ...],
    keep_below: float | None,
    key: str,
    writable: bool = True,
  ):
    self.path = Path(path)
    self.columns = columns
    self.writable = writable
    kept: dict[float, dict[str, float]] = {}
    if keep_below is not None:
      for row in read_rows(self.path):
        if row[key] < keep_below:
          kept.pop(row[key], None)
          kept[row[key]] = row  # the newest row of a repeated step wins
    self.rows: list[dict[str, float]] = sorted(kept.values(), key=lambda row: row[key])
    if not writable:
      return
    partial = self.path.with_name(self.path.name + '.tmp')
    try:
      with partial.open('w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        # A column added since the rows were written (an older run resumed) reads NaN.
        writer.writerows(
          {k: _format(row.get(k, float('nan'))) for k in columns} for row in self.rows
        )
      os.replace(partial, self.path)  # a full disk leaves the old file whole
    finally:
      partial.unlink(missing_ok=True)

  def append(self, row: dict[str, Any]) -> None:
    """Adds one row (every column required) and flushes it to disk."""
    self.extend([row])

  def extend(self, rows: list[dict[str, Any]]) -> None:
    """Adds ``rows`` (every column required) in one write, flushed to disk."""
    values = [{k: float(row[k]) for k in self.columns} for row in rows]
    self.rows.extend(values)
    if not self.writable:
      return
    with self.path.open('a', newline='') as handle:
      csv.DictWriter(handle, fieldnames=self.columns).writerows(
        {k: _format(v) for k, v in row.items()} for row in values
      )


def _format(value: float) -> str:
  """Integers as such; other values with 9 significant digits (a float32 reads back exactly)."""
  return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f'{value:.9g}'


def curves_figure(
  rows: list[dict[str, float]],
  *,
  columns: tuple[str, ...],
  x: str,
  title: str | None = None,
  smooth: int = 1,
) -> Figure:
  """One panel per column of ``rows``, plotted against column ``x``.

  ``pyplot`` draws it, so it shows inline in a notebook; the caller saves or
  closes it.

  Args:
    rows: the table, e.g. :class:`Table`'s rows or :func:`read_rows`.
    columns: the columns to plot, one panel each.
    x: the column on the horizontal axis (``epoch`` or ``step``).
    title: figure title.
    smooth: 1 draws each column with a marker per row; a larger width draws the
      raw values faintly and a trailing moving average of that many rows over them.
  """
  import matplotlib.pyplot as plt
  import numpy as np

  figure, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
  xs = np.asarray([r[x] for r in rows], np.float64)
  for axis, column in zip(axes[0], columns, strict=True):
    values = np.asarray([r[column] for r in rows], np.float64)
    if smooth > 1:
      axis.plot(xs, values, linewidth=0.8, alpha=0.5)
      if values.size >= smooth:
        average = np.convolve(values, np.ones(smooth) / smooth, mode='valid')
        axis.plot(xs[smooth - 1 :], average, linewidth=1.6)
    else:
      axis.plot(xs, values, marker='o')
    axis.set_title(column)
    axis.set_xlabel(x)
    axis.grid(alpha=0.3)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return figure


def plot_epochs(rows: list[dict[str, float]], directory: str | os.PathLike) -> None:
  """Writes ``losses.png`` (training losses) and ``map.png`` (validation metrics) per epoch."""
  if not rows:
    return
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  directory = Path(directory)
  panels = {
    'losses.png': ('training loss (batch mean)', ('loss', 'box', 'obj', 'cls')),
    'map.png': ('validation (EMA weights)', ('map50', 'map50_95', 'precision', 'recall')),
  }
  for name, (title, columns) in panels.items():
    figure = curves_figure(rows, columns=columns, x='epoch', title=title)
    figure.savefig(directory / name, dpi=90)
    plt.close(figure)


class Scalars:
  """TensorBoard scalars (tensorboardX), or nothing when disabled.

  Args:
    directory: event directory, or ``None`` to write nothing.
    purge_step: on resume, the first step to be written again; events at or
      after it from the interrupted run are hidden.
  """

  def __init__(self, directory: str | os.PathLike | None, *, purge_step: int | None):
    self._writer = None
    if directory is not None:
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(str(directory), purge_step=purge_step)

  def add(self, values: dict[str, float], *, step: int, prefix: str) -> None:
    """Writes ``prefix/name`` scalars at ``step``."""
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(f'{prefix}/{name}', float(value), step)

  def close(self) -> None:
    """Flushes and closes the event file."""
    if self._writer is not None:
      self._writer.close()


class Progress:
  """A per-epoch progress bar (tqdm) with loss parts, images/s and the run's ETA.

  Args:
    enabled: ``False`` draws nothing (messages are still printed).
    total_steps: steps of the whole run, for its ETA.
    batch_size: images per step.
    silent: prints nothing at all, messages included (the processes of a
      multi-process run other than the first).
  """

  def __init__(self, *, enabled: bool, total_steps: int, batch_size: int, silent: bool = False):
    self.enabled = enabled and not silent
    self.silent = silent
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._bar = None

  def start_epoch(self, *, epoch: int, epochs: int, steps: int, done: int) -> None:
    """Opens the bar of ``epoch`` (``steps`` in it, ``done`` of them already run)."""
    if not self.enabled:
      return
    from tqdm import tqdm

    self._bar = tqdm(
      total=steps,
      initial=done,
      desc=f'epoch {epoch + 1}/{epochs}',
      unit='step',
      dynamic_ncols=True,
      leave=True,
      mininterval=1.0,
    )

  def update(
    self, *, metrics: dict[str, float], images_per_s: float, step: int, steps: int = 1
  ) -> None:
    """Advances ``steps`` steps; ``step`` is the run's steps done so far, ``metrics`` the last's."""
    if self._bar is None:
      return
    left = (self.total_steps - step) * self.batch_size / images_per_s if images_per_s > 0 else 0
    self._bar.set_postfix_str(
      f'box {metrics["box"]:.4f} obj {metrics["obj"]:.4f} cls {metrics["cls"]:.4f} '
      f'{images_per_s:.1f} img/s, run ETA {_clock(left)}',
      refresh=False,
    )
    self._bar.update(steps)

  def end_epoch(self) -> None:
    """Closes the epoch's bar."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def write(self, message: str) -> None:
    """Prints ``message`` without breaking the bar."""
    if self.silent:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)


def _clock(seconds: float) -> str:
  seconds = max(0, int(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'
