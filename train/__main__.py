"""``python -m train``: ``reorg-jax train`` from a checkout (the README's main job)."""

from reorg_jax.program.commands import train

if __name__ == '__main__':
  raise SystemExit(train.main(prog='python -m train'))
