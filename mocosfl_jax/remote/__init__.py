"""Training with remote clients: the server (`python -m mocosfl_jax.serve`) and edge clients.

wire: the messages (safetensors, checked on arrival); transport: gRPC with tokens, TLS and size
limits; coordinator: the server's per-step rounds and every check on what arrives; steps: the
server's jitted step with remote rows; client_loop: a client's side of the protocol;
edge_augment: the training augmentation in numpy, for clients without JAX.
wire, transport, coordinator, client_loop and edge_augment import no JAX (devices run them).
"""
