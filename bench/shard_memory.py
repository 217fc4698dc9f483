"""`python bench/shard_memory.py ...` = `python -m mocosfl_jax.benchmarks.shard_memory ...` (see that module)."""
from mocosfl_jax.benchmarks import shard_memory

if __name__ == "__main__":
  shard_memory.main()
