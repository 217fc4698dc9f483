"""`python bench/remote_step.py ...` = `python -m mocosfl_jax.benchmarks.remote ...` (see that module)."""
from mocosfl_jax.benchmarks import remote

if __name__ == "__main__":
  remote.main()
