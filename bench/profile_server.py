"""`python bench/profile_server.py ...` = `python -m mocosfl_jax.benchmarks.op_profile ...`.

See that module for what it measures and its flags.
"""
from mocosfl_jax.benchmarks import op_profile

if __name__ == "__main__":
  op_profile.main()
