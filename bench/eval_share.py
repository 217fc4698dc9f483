"""`python bench/eval_share.py ...` is `python -m mocosfl_jax.benchmarks.eval_share ...`."""
from mocosfl_jax.benchmarks import eval_share

if __name__ == "__main__":
  eval_share.main()
