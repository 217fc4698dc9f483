"""`python bench/eval_share.py ...` = `python -m mocosfl_jax.benchmarks.eval_share ...` (see that module)."""
from mocosfl_jax.benchmarks import eval_share

if __name__ == "__main__":
  eval_share.main()
