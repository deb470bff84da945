"""easylm-align: adapt English-centric LLaMA models to other languages with JAX/Flax."""

__version__ = "0.1.0"
