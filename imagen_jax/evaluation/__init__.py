"""Evaluation metrics: FID with the FID Inception-v3 (`fid`, `inception`, `torch_checkpoint`)
CLIP score (`clip`, `clip_model`, `clip_tokenizer`), and the synthetic shapes metric (`shapes`).

Submodules import JAX lazily where they can, so `imagen-jax eval --help` stays cheap.
"""
