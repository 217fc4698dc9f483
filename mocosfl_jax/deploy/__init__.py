"""Deployment of the client slice to devices: ONNX export, int8 quantisation, the device runtime.

onnx_export builds the ONNX graph of a client slice from the model definition (numpy + onnx);
client_checkpoint reads one client's variables out of a training checkpoint; to_onnx
(`python -m mocosfl_jax.deploy.to_onnx`) exports a run's client slice and checks it against JAX;
quantize (`python -m mocosfl_jax.deploy.quantize`) makes an optional int8 copy and reports the
activation error it costs; run_client runs an exported slice with numpy and onnxruntime only,
the one file to copy to a device.
"""
