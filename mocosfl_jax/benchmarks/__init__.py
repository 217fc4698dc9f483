"""Benchmarks of the training step on this machine: `python -m mocosfl_jax.benchmarks.<name>`.

step: the pieces of one step per (clients, cut) setting, each in its own subprocess;
augment: the two-view augmentation alone; op_profile: XLA op time by kind from a profiler trace;
shard_memory: per-device memory of the shard_map step from XLA's memory analysis (nothing run);
compiles: counting a jitted function's compilations (also used by the tests).
The scripts in the repository's bench/ folder are one-call wrappers of these; bench/README.md
records the results, bench/torch_reference.py is the PyTorch side of the comparison and
bench/summarize.py turns the step results into the README table.
"""
