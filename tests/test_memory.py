"""The allocator settings of `qinco serve` (service/memory.py): memory a point does not use is not resident."""

import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# In a fresh interpreter: a 64 MiB array, one byte touched in each of 8 places 8 MiB apart
# (as a load touches the start of each list's room): the RSS it adds, in KiB.
PROBE = """
import sys
import numpy as np
from service.memory import fix_malloc_thresholds, no_huge_pages_for_arrays
fix_malloc_thresholds()
if sys.argv[1] == "off":
    assert no_huge_pages_for_arrays()
def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")))
a = np.empty(64 << 20, np.uint8)
before = rss()
a[::8 << 20] = 1
print(rss() - before)
"""


def grown_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout)


def test_touching_a_few_rows_of_a_large_array_makes_only_their_pages_resident():
    if not THP.exists() or "[madvise]" not in THP.read_text():
        pytest.skip("transparent huge pages are not in madvise mode here: numpy's request changes nothing")
    if grown_kib("on") < 8 * 1024:  # numpy's default: a 2 MiB page for each byte touched, when granted
        pytest.skip("the kernel granted no huge pages here (fragmented memory): nothing to turn off")
    assert grown_kib("off") < 1024  # 8 pages of 4 KiB (and page tables)


# In a fresh interpreter: 200,000 blocks of 1 KB from malloc (Python's own allocator takes those
# under 512 B), every 50th kept: the heap full of holes, as SQLite's pages and rows of a
# transaction over every point leave it; then the heap trimmed: the RSS that gave back, in KiB.
FRAGMENTED = """
from service.memory import fix_malloc_thresholds, release_free_memory
fix_malloc_thresholds()
def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")))
rows = [bytes(1000) + bytes([i % 256]) for i in range(200_000)]
kept = rows[::50]
del rows
before = rss()
assert release_free_memory()
print(before - rss())
"""


def test_free_blocks_in_the_heaps_middle_are_given_back():
    from service.memory import release_free_memory
    if not release_free_memory():
        pytest.skip("not glibc: malloc_trim does not exist here")
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert int(out.stdout) > 100 * 1024  # most of the ~200 MiB freed (the kept 1 in 50 pin some pages)
