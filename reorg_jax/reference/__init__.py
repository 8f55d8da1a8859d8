"""The reference implementation (``sas-yolov7``, upstream's code) as a test oracle.

Needs the ``test`` extra (``torch==2.13.0`` and ``sas-yolov7==1.0.7``); nothing
else in the package imports this subpackage. The tests, the benchmarks and
the notebooks share it from here:

* :mod:`reorg_jax.reference.oracle` registers a stand-in for ``torchvision``
  (no CPU build exists here; the reference imports it at module level but
  never calls it on the paths used) and works around the package's label-scan
  progress bar. Importing this package registers the stand-in: import it
  before any module of ``sas_yolov7``.
* :mod:`reorg_jax.reference.models` builds upstream's models with perturbed
  weights for parity comparisons.
"""

from reorg_jax.reference import oracle  # registers the torchvision stand-in

__all__ = ['oracle']
