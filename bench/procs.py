"""/proc readers: a process tree's CPU time and memory."""
from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def tree(root: int) -> list[int]:
    """root and all its descendants (processes, not threads)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat; all threads included) summed."""
    total = 0
    for p in pids:
        f = _stat_fields(p)
        if f is None:
            continue
        total += int(f[11]) + int(f[12])  # fields 14, 15 (1-based) -> index 11, 12 after state
    return total / CLK_TCK


def memory_kb(pids: list[int]) -> dict[str, int]:
    """Pss (smaps_rollup) and VmRSS summed over pids, in kB."""
    pss = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                        break
        except OSError:
            pass
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                        break
        except OSError:
            pass
    return {"pss_kb": pss, "rss_kb": rss}


def system_cpu() -> dict[str, float]:
    """Machine-wide busy and steal seconds (all CPUs) from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    v = [int(x) for x in parts[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return {"busy": (user + nice + system + irq + softirq + steal) / CLK_TCK, "steal": steal / CLK_TCK}


def listening_inodes(port: int) -> set[int]:
    """Inodes of TCP sockets listening on any IPv4/IPv6 address with this port."""
    out = set()
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        out.add(int(parts[9]))
        except OSError:
            pass
    return out


def owns_listener(pids: list[int], port: int) -> bool:
    """Does one of pids hold the socket listening on port?"""
    want = {f"socket:[{i}]" for i in listening_inodes(port)}
    if not want:
        return False
    for p in pids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    if os.readlink(f"/proc/{p}/fd/{fd}") in want:
                        return True
                except OSError:
                    pass
        except OSError:
            pass
    return False
