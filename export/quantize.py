"""`python export/quantize.py ...` = `python -m mocosfl_jax.deploy.quantize ...` (see that module)."""
from mocosfl_jax.deploy import quantize

if __name__ == "__main__":
  quantize.main()
