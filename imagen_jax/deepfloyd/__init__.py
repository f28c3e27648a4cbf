"""DeepFloyd IF in imagen_jax: diffusers checkpoints -> `DeepFloydUNet` params, and the stage
adapter that runs IF's networks on the cascade's log-SNR samplers."""

# A --stage_dirs / init_from entry naming an IF stage dir (diffusers layout): `if:PATH`.
IF_PREFIX = "if:"
