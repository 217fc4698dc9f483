"""Counts the XLA compilations of one jitted function, through jax's public monitoring events.

For every program jax compiles (or fetches from the persistent compilation cache) it records a
backend-compile event that names the function, 'jit(<name>)'; a call served by the function's
in-memory executable cache records none. The step benchmark and the tests use this to show that
new argument values (queue pointers, steps, pools, padded tails) reuse one executable.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Compiles:
  """How many times the function named `name` was compiled inside the `count_compiles` block."""
  name: str
  count: int = 0


@contextlib.contextmanager
def count_compiles(fn: Callable) -> Iterator[Compiles]:
  """Counts compilations of `fn` (a jitted function, matched by its __name__) within the block.

  Compilations of other functions (nested jits, eager ops) are not counted; two jitted functions
  that share a __name__ are counted together.
  """
  counter = Compiles(f"jit({fn.__name__})")

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs
    if event == BACKEND_COMPILE_EVENT and kwargs.get("fun_name") == counter.name:
      counter.count += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
