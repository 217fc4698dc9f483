"""All defaults: CIFAR-10, ResNet-18 cut 1, 5 clients (B 20, avg_freq 10), V2, lr 0.06.

    python -m mocosfl_jax.main --config configs/default.py --workdir runs/default \
        --config.num_clients=5 --config.data_dir=~/tensorflow_datasets

The base every other config overrides; see configs/mocosfl_table2.py for the paper's settings
and docs/reference.md, 'Argument defaults', for how they relate to the reference's defaults.
"""
from mocosfl_jax.config import get_config  # noqa: F401
