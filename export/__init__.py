"""ONNX export of the client slice (see export/onnx_export.py for the why and the how).

`onnx_export` builds the graph (numpy + onnx, model structure from mocosfl_jax.models),
`client_checkpoint` reads one client's variables out of a training checkpoint, and the scripts
`to_onnx.py` (export), `run_client.py` (numpy + onnxruntime only, for the device) and
`quantize.py` (optional int8) are the command-line entry points.
"""
