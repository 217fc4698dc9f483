"""`python export/edge_client.py ...` = `python -m mocosfl_jax.deploy.edge_client ...` (see that
module): a frozen ONNX client of a run served by `python -m mocosfl_jax.serve`; no JAX needed."""
import sys

from mocosfl_jax.deploy import edge_client

if __name__ == "__main__":
  sys.exit(edge_client.main())
