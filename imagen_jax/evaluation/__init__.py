"""Evaluation metrics: FID with the FID Inception-v3 (`fid`, `inception`, `torch_checkpoint`)
and CLIP score (`clip`, `clip_model`, `clip_tokenizer`).

Submodules import JAX lazily where they can, so `imagen-jax eval --help` stays cheap.
"""
