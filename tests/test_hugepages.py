"""The training program asks glibc for huge pages once, and leaves a user's own setting alone."""
import os
import platform
import subprocess
import sys

import pytest

from mocosfl_jax import hugepages

from core_testlib import PACKAGE_PARENT

GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC_LINUX, reason="a glibc tunable")
def test_the_tunable_is_added_to_what_the_user_set_and_never_overrides_it():
  assert hugepages.wanted_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  got = hugepages.wanted_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert got["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert hugepages.wanted_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert hugepages.wanted_environment({hugepages.OPT_OUT: "1"}) is None


@pytest.mark.skipif(not GLIBC_LINUX, reason="a glibc tunable")
def test_the_program_restarts_itself_once_with_the_same_arguments_and_pid():
  code = ("import os, sys; from mocosfl_jax import hugepages; "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
          "hugepages.reexec_with_huge_pages()")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
  env["PYTHONPATH"] = PACKAGE_PARENT
  out = subprocess.run([sys.executable, "-c", code, "--flag", "x"], env=env, text=True,
                       capture_output=True, timeout=60, check=True).stdout.splitlines()
  assert len(out) == 2                        # once, then the restarted process returns
  (pid1, tun1, args1), (pid2, tun2, args2) = (line.split(" ", 2) for line in out)
  assert pid1 == pid2 and args1 == args2 == "['--flag', 'x']"
  assert tun1 == "None" and tun2 == "glibc.malloc.hugetlb=1"
