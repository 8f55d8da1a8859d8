"""reorg-jax: YOLOv7 P6 training machinery in JAX/Flax."""

from reorg_jax.reorg import ReOrg, reorg

__all__ = ['ReOrg', 'reorg']
