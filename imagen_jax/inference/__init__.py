"""Inference: sampling settings, stage and encoder loading, the cascade and export bundles."""
