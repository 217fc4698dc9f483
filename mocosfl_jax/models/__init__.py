"""Split networks: every backbone and cut of the reference as pure Flax functions."""
from mocosfl_jax.models.split import (ARCHS, SplitConfig, SplitNet, build, full_network,
                                      num_layers, split_variables, validate)

__all__ = ["ARCHS", "SplitConfig", "SplitNet", "build", "full_network", "num_layers",
           "split_variables", "validate"]
