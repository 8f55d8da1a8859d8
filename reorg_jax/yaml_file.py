"""Reading a YAML file with errors in one line: ``<file>:<line>:<column>: <what is wrong>``.

PyYAML's own messages run over several lines, point at ``<unicode string>``
when given text, and quote the offending line with a caret. Every YAML file
the package reads (the program's configurations, dataset YAMLs, model YAMLs)
goes through :func:`read`, so a tab in the indentation or an unclosed
bracket is reported as::

  data.yaml:3:1: found character '\\t' that cannot start any token

with the line and column counted from 1, as editors show them.
"""

from __future__ import annotations

import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

__all__ = ['YamlFileError', 'describe', 'read']


class YamlFileError(ValueError):
  """A YAML file that cannot be read or parsed; the message is one line starting with the file.

  Attributes:
    path: the file.
    line: the 1-based line of a syntax error (``None`` when unreadable).
    column: its 1-based column.
  """

  def __init__(
    self, message: str, *, path: str, line: int | None = None, column: int | None = None
  ):
    super().__init__(message)
    self.path = path
    self.line = line
    self.column = column


def describe(error: yaml.YAMLError, *, path: str | os.PathLike | Traversable) -> YamlFileError:
  """One line for PyYAML's ``error`` in ``path``: its location, then the problem and its context."""
  mark = getattr(error, 'problem_mark', None) or getattr(error, 'context_mark', None)
  problem = getattr(error, 'problem', None) or str(error)
  context = getattr(error, 'context', None)
  what = ' '.join(str(problem).split())
  if context:
    what += f' ({" ".join(str(context).split())})'
  if mark is None:
    return YamlFileError(f'{path}: not valid YAML: {what}', path=str(path))
  line, column = mark.line + 1, mark.column + 1
  return YamlFileError(f'{path}:{line}:{column}: {what}', path=str(path), line=line, column=column)


def read(path: str | os.PathLike | Traversable) -> Any:
  """The YAML document in ``path`` (``None`` for an empty file).

  Raises:
    YamlFileError: the file cannot be read (``<file>: cannot read: <reason>``)
      or is not valid YAML (``<file>:<line>:<column>: <problem>``).
  """
  source = Path(path) if isinstance(path, (str, os.PathLike)) else path
  try:
    text = source.read_text()
  except OSError as error:
    raise YamlFileError(f'{path}: cannot read: {error.strerror or error}', path=str(path)) from None
  except UnicodeDecodeError as error:
    raise YamlFileError(f'{path}: cannot read: not UTF-8 text ({error})', path=str(path)) from None
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as error:
    raise describe(error, path=path) from None
