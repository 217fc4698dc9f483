"""Huge pages for XLA:CPU's temporaries: the training program restarts itself with glibc's
`glibc.malloc.hugetlb=1` tunable.

XLA:CPU allocates its large temporary buffers afresh on every call of the step. With 4 KiB pages
each one is mapped, faulted in page by page and unmapped again, so a small step spends much of
its time in the kernel (on the quickstart: millions of minor page faults, a sixth of the CPU
time). The tunable makes glibc's malloc ask for transparent huge pages (`madvise`), which cuts
the faults by a factor of about 30 (bench/README.md). glibc reads tunables only when a process
starts, and users should not have to set environment variables, so `python -m
mocosfl_jax.main` re-executes itself once, with the same arguments and process id
(`os.execve`), when the variable does not already ask for it. `MOCOSFL_NO_HUGEPAGES=1` turns
this off; other platforms, and in-process calls of `main.main([...])`, are left alone.
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MOCOSFL_NO_HUGEPAGES"


def wanted_environment(env) -> dict | None:
  """`env` with the tunable added, or None if nothing is to change."""
  if env.get(OPT_OUT) or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  current = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current:
    return None                            # the user's own setting wins
  return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [current, TUNABLE]))}


def reexec_with_huge_pages() -> None:
  """Replaces this process with itself under the tunable (returns if nothing is to change)."""
  env = wanted_environment(os.environ)
  argv = getattr(sys, "orig_argv", None)
  if env is None or not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
