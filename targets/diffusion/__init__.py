"""targets/diffusion."""
