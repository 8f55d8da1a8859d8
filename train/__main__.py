"""``python -m train``: ``reorg-jax train`` from a checkout (the README's main job)."""

from reorg_jax.program import allocator

if __name__ == '__main__':
  allocator.restart_with_huge_pages()  # glibc reads its tunables at start: before any work

  from reorg_jax.program.commands import train

  raise SystemExit(train.main(prog='python -m train'))
