"""`python bench/hetero_step.py ...` = `python -m mocosfl_jax.benchmarks.hetero ...` (see that module)."""
from mocosfl_jax.benchmarks import hetero

if __name__ == "__main__":
  hetero.main()
