"""The diffusion core: pure, jit-able functions of arrays; no networks.

schedules (log-SNR), process (forward process, ε/v/x̂₀ conversions), losses, guidance,
thresholding, samplers (ancestral, DDIM), noise_aug (SR conditioning augmentation).
"""
