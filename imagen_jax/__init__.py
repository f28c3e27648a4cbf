"""imagen_jax: Imagen (Saharia et al. 2022) in JAX/Flax, sharded from one CPU to a TPU pod.

Subpackages: `diffusion` (schedules, losses, samplers), `nn` (U-Nets, T5 encoder), `text`
(vocabulary, checkpoint readers), `data` (TFDS sources, precompute, training input).
Import submodules directly; this package imports nothing heavy.
"""

__version__ = "0.1.0"
