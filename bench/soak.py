"""`python bench/soak.py ...` = `python -m mocosfl_jax.benchmarks.soak ...` (see that module)."""
from mocosfl_jax.benchmarks import soak

if __name__ == "__main__":
  soak.main()
