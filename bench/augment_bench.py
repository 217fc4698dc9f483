"""`python bench/augment_bench.py ...` = `python -m mocosfl_jax.benchmarks.augment ...` (see that module)."""
from mocosfl_jax.benchmarks import augment

if __name__ == "__main__":
  augment.main()
