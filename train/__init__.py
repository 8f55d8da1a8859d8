"""The training program: ``python -m train`` (see :mod:`train.main`)."""
