"""mocosfl_jax: MocoSFL / MonAcoSFL split federated self-supervised learning in JAX."""

__version__ = "0.1.0"
