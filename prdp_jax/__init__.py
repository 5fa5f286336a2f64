"""prdp-jax: PRDP (and DDPO) reward finetuning of text-to-image diffusion models in JAX/Flax."""

__version__ = "0.1.0"
