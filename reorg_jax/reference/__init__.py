"""The reference implementation (``sas-yolov7``, upstream's code) as a test oracle.

Needs the ``test`` or ``verify`` extra (``torch==2.13.0`` and ``sas-yolov7==1.0.7``);
the package imports this subpackage only in ``reorg-jax verify``, after
checking that they are installed. The tests, the benchmarks, the notebooks
and ``verify`` share it from here:

* :mod:`reorg_jax.reference.oracle` registers a stand-in for ``torchvision``
  (no CPU build exists here; the reference imports it at module level but
  never calls it on the paths used) and works around the package's label-scan
  progress bar. Importing this package registers the stand-in: import it
  before any module of ``sas_yolov7``.
* :mod:`reorg_jax.reference.models` builds upstream's models with perturbed
  weights for parity comparisons.
* :mod:`reorg_jax.reference.train_aux` is upstream's ``train_aux.py`` training
  loop around the package's model, loss and EMA.
* :mod:`reorg_jax.reference.step_check` runs both frameworks' training steps
  from one state, each in its own process, and compares them tensor by tensor
  (``reorg-jax verify``, ``benchmarks/trained_step.py``).
* :mod:`reorg_jax.reference.detect_check` runs upstream's detection pipeline
  (its ``LoadImages``, model, ``non_max_suppression`` with an exact greedy
  suppression for torchvision's, ``scale_coords``) and compares detections and
  decoded outputs with ours (``tests/test_detect.py``, ``tests/test_export.py``,
  ``benchmarks/deploy_check.py``).
"""

from reorg_jax.reference import oracle  # registers the torchvision stand-in

__all__ = ['oracle']
