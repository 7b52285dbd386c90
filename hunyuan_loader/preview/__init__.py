"""Live previews of the image while it samples: a latent -> RGB projection fitted on first use from the
checkpoint's own VAE (``vae_fit``), applied to the flow model's x0 prediction at each step (``stream``).
"""
