"""Host memory: with the retained heap, a repeated large CPU allocation stops faulting in fresh pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# Allocate and free two 64 MiB tensors 20 times; report whether the thresholds were set and the minor page faults
# of the last 16 rounds (the first ones grow the heap).
PROBE = """
import json, resource, sys, torch
from unirl.hostmem import retain_freed_memory
on = retain_freed_memory()
for i in range(20):
    if i == 4:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, every page written
    y = x * 2
    del x, y
print(json.dumps({"on": on, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start}))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "UNIRL_RETAIN_FREED_MEMORY"}
    if env_value is not None:
        env["UNIRL_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_heap_reuses_large_blocks_and_the_switch_turns_it_off():
    pages = 2 * 64 * 1024 * 1024 // 4096  # faults one round costs when both blocks are mmapped afresh
    on, off = _probe(None), _probe("0")
    assert on["on"] is True and off["on"] is False
    assert off["faults"] >= 15 * pages  # glibc default: every block is a fresh mmap, faulted in page by page
    assert on["faults"] <= 4 * pages  # retained: freed blocks are reused from the heap (measured: 0-2 rounds of 16)
