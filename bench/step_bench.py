"""`python bench/step_bench.py ...` = `python -m mocosfl_jax.benchmarks.step ...` (see that module)."""
from mocosfl_jax.benchmarks import step

if __name__ == "__main__":
  step.main()
