"""Checks of python -m bench.syscalls's reading of strace's summary and of its table.

    python -m pytest bench/test_syscalls.py
"""
from __future__ import annotations

import pytest

from bench import syscalls

DEFAULT = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 31.43    0.003207          94        34        13 openat
 15.83    0.001615          53        30           mmap
  0.00    0.000000           0         1           statx
------ ----------- ----------- --------- --------- ----------------
100.00    0.010203          70        65        13 total
"""

COLUMNS = """\
syscall              calls    errors
---------------- --------- ---------
recvfrom             20300       300
sendto               20000          
sched_getaffinity        2          
epoll_wait             150          
---------------- --------- ---------
total                40452       300
"""


def test_default_layout():
    c = syscalls.parse_summary(DEFAULT)
    assert c["openat"] == {"calls": 34, "errors": 13}
    assert c["mmap"] == {"calls": 30, "errors": 0}
    assert c["total"] == {"calls": 65, "errors": 13}


def test_name_calls_errors_layout_and_long_names():
    c = syscalls.parse_summary("strace: Process 12 attached\n" + COLUMNS)
    assert c["recvfrom"] == {"calls": 20300, "errors": 300}
    assert c["sched_getaffinity"]["calls"] == 2      # a name wider than its column
    assert c["total"] == {"calls": 40452, "errors": 300}


def test_two_personalities_add_up():
    c = syscalls.parse_summary(DEFAULT + "System call usage summary for 32 bit mode:\n" + DEFAULT)
    assert c["openat"]["calls"] == 68 and c["total"]["calls"] == 130


@pytest.mark.parametrize("text,msg", [
    ("", "no strace summary table"),
    (DEFAULT.replace("100.00    0.010203          70        65", "100.00    0.010203          70        66"),
     "not the sum"),
    (COLUMNS.replace("20000", "2x000"), "unreadable"),
    (COLUMNS.rsplit("total", 1)[0], "without its total row"),
])
def test_bad_summaries_are_refused(text, msg):
    with pytest.raises(syscalls.ParseError, match=msg):
        syscalls.parse_summary(text)


def test_table_divides_by_the_work_and_marks_failures():
    def rec(target, counts, units):
        return {"target": target, "ok": True, "units": units, "unit": "request", "counts": counts,
                "command": f"wsload --mode http --port {1000 + units} --count {units}",
                "per_unit": {k: {"calls": v["calls"] / units, "errors": v["errors"] / units} for k, v in counts.items()}}
    fw = rec("fastws", syscalls.parse_summary(COLUMNS), 10000)
    ng = rec("nginx", {"recvfrom": {"calls": 20000, "errors": 0}, "writev": {"calls": 20000, "errors": 0},
                       "total": {"calls": 40000, "errors": 0}}, 10000)
    bad = {"target": "haproxy", "ok": False, "error": "3 errors: reset", "unit": "request"}
    md = syscalls.table("http", [fw, ng, bad], top=2)
    assert "| **total** | **4.05 (0.03 failed)** | **4.00** | **FAILED** |" in md
    assert "| vs nginx | 1.01x | 1.00x | — |" in md
    assert "| `recvfrom` | 2.03 (0.03 failed) | 2.00 | — |" in md
    assert "| `writev` | 0 | 2.00 | — |" in md
    assert "| other calls | 0.02 | 0 | — |" in md        # epoll_wait and sched_getaffinity
    assert "HAProxy FAILED: 3 errors: reset" in md
    assert md.count("load: `wsload --mode http --port PORT") == 1
