"""Data layer: in-memory datasets, client partitions, on-device sampling and augmentation.

Nothing here imports TensorFlow; `mocosfl_jax.data.prepare` (run once per dataset) is the only place
that needs it. `augment` and `partition` are not re-exported here because they share their
module's name (re-exporting would shadow the modules); import them from their modules.
"""
from mocosfl_jax.data.augment import two_views
from mocosfl_jax.data.partition import partition_summary
from mocosfl_jax.data.partition import write_partition_summary
from mocosfl_jax.data.sampler import batch_indices
from mocosfl_jax.data.sampler import ClientTable
from mocosfl_jax.data.sampler import num_batches_per_epoch
from mocosfl_jax.data.sources import ArrayDataset
from mocosfl_jax.data.sources import DATASETS
from mocosfl_jax.data.sources import DatasetNotPreparedError
from mocosfl_jax.data.sources import holdout
from mocosfl_jax.data.sources import load

__all__ = [
    "ArrayDataset", "ClientTable", "DATASETS", "DatasetNotPreparedError",
    "batch_indices", "holdout", "load", "num_batches_per_epoch", "partition_summary",
    "two_views", "write_partition_summary",
]
