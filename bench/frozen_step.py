"""`python bench/frozen_step.py ...` = `python -m mocosfl_jax.benchmarks.frozen ...` (see that module)."""
from mocosfl_jax.benchmarks import frozen

if __name__ == "__main__":
  frozen.main()
