"""``python -m train``: see :mod:`train.main`."""

from train.main import main

if __name__ == '__main__':
  raise SystemExit(main())
