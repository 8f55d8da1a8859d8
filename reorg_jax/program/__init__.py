"""The ``reorg-jax`` program: its subcommands and the training run behind them.

``reorg-jax <command>`` (installed as a console script, :func:`reorg_jax.program.cli.main`)
runs one module of :mod:`reorg_jax.program.commands`; ``python -m train`` from a
checkout is ``reorg-jax train``. The modules here are the program's, not the
library's: they read the configuration (:mod:`~reorg_jax.program.config`,
resolved once into :mod:`~reorg_jax.program.sections`), run and record a
training run (:mod:`~reorg_jax.program.loop`, :mod:`~reorg_jax.program.evaluation`,
:mod:`~reorg_jax.program.report`, :mod:`~reorg_jax.program.rundir`) and read
weights from other programs (:mod:`~reorg_jax.program.weights`). The run's
model, loss, optimiser and state come from the library's one assembly,
:mod:`reorg_jax.training.assembly`.
"""
