"""``python -m train`` from a checkout: ``reorg-jax train`` (see :mod:`reorg_jax.program.commands.train`)."""
