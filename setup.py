"""imagen_jax: a JAX/Flax, TPU-native implementation of Imagen (Saharia et al. 2022)."""

import setuptools

setuptools.setup(
  name="imagen_jax",
  version="0.1.0",
  description="Imagen cascaded text-to-image diffusion in JAX/Flax, sharded from one CPU to a TPU pod.",
  packages=setuptools.find_packages(include=["imagen_jax", "imagen_jax.*"]),
  # The gin configs ship inside the package (the repository's top-level configs/ links here),
  # so `configs/...` paths resolve from any directory and from a non-editable install.
  package_data={"imagen_jax": ["configs/*/*.gin"]},
  python_requires=">=3.12",
  # Floors are the versions verified together on Python 3.12 (jax >= 0.11 needs it).
  install_requires=[
    "jax>=0.12.0",
    "jaxlib>=0.12.0",
    "flax>=0.12.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.90",
    # Full tensorflow only: tensorflow-cpu beside it would install a second copy.
    "tensorflow>=2.21.0",
    "tensorflow-datasets>=4.9.10",
    "tensorflow-text>=2.21.0",
    "seqio>=0.0.20",
    "gin-config>=0.5.0",
    "sentencepiece>=0.2.1",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "tqdm>=4.66",
    "tensorstore>=0.1.80",
    "msgpack>=1.0",
    "safetensors>=0.4",
    "tensorboard>=2.21.0",
    "array-record>=0.8.0",
    # TFDS 4.9.10 imports it when building local builders but does not declare it.
    "importlib_resources>=6.0",
  ],
  extras_require={
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.15"],
    # Deviceless TPU compiles (`imagen-jax compile`) and TPU VMs: the libtpu jax[tpu] pins.
    "tpu": ["jax[tpu]>=0.12.0"],
  },
  entry_points={"console_scripts": ["imagen-jax=imagen_jax.cli:main"]},
)
