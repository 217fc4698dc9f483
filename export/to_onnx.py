"""`python export/to_onnx.py ...` = `python -m mocosfl_jax.deploy.to_onnx ...` (see that module)."""
from mocosfl_jax.deploy import to_onnx

if __name__ == "__main__":
  to_onnx.main()
