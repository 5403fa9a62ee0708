"""Freed message buffers stay in a gRPC process (glibc), unless COTUNE_KEEP_FREED_MIB=0."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Allocate and touch a 16 MiB block, free it: how much resident memory did freeing give back?
PROBE = """
import sys
from cotune.deploy.malloc import keep_freed_memory
applied = keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
buf = bytearray(16 << 20)
full = rss()
del buf
print(applied, (full - rss()) >> 20)
"""


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})  # fmt: skip
    applied, returned_mib = out.stdout.split()
    return applied == "True", int(returned_mib)


def test_a_freed_message_sized_block_stays_for_the_next_message():
    applied, returned = probe()
    assert applied and returned < 2


def test_zero_leaves_glibc_defaults():
    applied, returned = probe(COTUNE_KEEP_FREED_MIB="0")
    assert not applied and returned >= 15  # glibc unmapped the block at once


def test_a_bad_setting_is_ignored_with_a_warning():
    applied, returned = probe(COTUNE_KEEP_FREED_MIB="lots")
    assert not applied and returned >= 15
