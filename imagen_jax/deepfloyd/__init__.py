"""DeepFloyd IF in imagen_jax: diffusers checkpoints -> `DeepFloydUNet` params, and the stage
adapter that runs IF's networks on the cascade's log-SNR samplers."""
