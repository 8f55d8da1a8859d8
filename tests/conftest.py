"""Shared pytest setup: the reference implementation's torchvision stand-in."""

import oracle  # noqa: F401  (registers the torchvision stand-in before any test imports sas_yolov7)
