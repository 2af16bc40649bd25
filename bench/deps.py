"""Make sure the peers (nginx, HAProxy from Debian's packages) and matplotlib are present."""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

SBIN = ["/usr/sbin", "/sbin", "/usr/local/sbin"]


def which(prog: str) -> str | None:
    found = shutil.which(prog)
    if found:
        return found
    for d in SBIN:
        p = os.path.join(d, prog)
        if os.access(p, os.X_OK):
            return p
    return None


def ensure_debian_packages(log=print) -> list[str]:
    """Install nginx-light and haproxy with apt-get if their binaries are absent.

    Returns a list of notes (problems) for the report; never raises."""
    notes = []
    wanted = {"nginx": "nginx-light", "haproxy": "haproxy"}
    missing = [pkg for prog, pkg in wanted.items() if not which(prog)]
    if not missing:
        return notes
    if not shutil.which("apt-get"):
        return [f"missing {', '.join(missing)} and no apt-get to install them"]
    if os.geteuid() != 0:
        return [f"missing {', '.join(missing)}; run as root (or apt-get install -y {' '.join(missing)}) to compare against them"]
    log(f"installing {' '.join(missing)} from Debian's packages (apt-get update; apt-get install -y ...)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], env=env, check=False, stdout=subprocess.DEVNULL)
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env,
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        notes.append(f"apt-get install {' '.join(missing)} failed: {r.stderr.strip()[-300:]}")
    for prog, pkg in wanted.items():
        # Debian starts the packaged services on install; the bench runs its own
        # instances on other ports and leaves the system services alone.
        if not which(prog):
            notes.append(f"{prog} ({pkg}) is not available: its targets are skipped")
    return notes


def ensure_strace(log=print) -> str | None:
    """strace's path, installing Debian's package as root if it is missing (python -m bench.syscalls)."""
    exe = which("strace")
    if exe or not shutil.which("apt-get") or os.geteuid() != 0:
        return exe
    log("installing strace from Debian's packages (apt-get install -y strace)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "strace"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "strace"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return which("strace")


def ensure_matplotlib(log=print) -> str | None:
    """Import matplotlib, installing it with pip if missing. Returns a note on failure."""
    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is missing: installing it with pip for the plots (pip install matplotlib)")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"],
                           check=False, capture_output=True, text=True)
        importlib.invalidate_caches()
        if r.returncode != 0 or importlib.util.find_spec("matplotlib") is None:
            return "matplotlib could not be installed; PNG plots were not written"
    return None


def repo_path(env: dict | None) -> str:
    """PYTHONPATH with the repository first (its `bench` package importable), after `env`'s."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = (env or {}).get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")
    return repo + (os.pathsep + rest if rest and rest != repo else "")


def fastws_command() -> tuple[list[str] | None, dict | None, str]:
    """How to start fastws: (command, extra environment, note), or (None, None, why it is skipped).

    Either an installed `fastws` command, or the checkout's own package run as
    `python -m fastws` from the repository root. Both must answer --help."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tries = []
    exe = shutil.which("fastws")
    if exe:
        tries.append(([exe], None, "the installed `fastws` command"))
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tries.append(([sys.executable, "-m", "fastws"], {"PYTHONPATH": env["PYTHONPATH"]},
                  "the checkout's fastws, run as `python -m fastws`"))
    last = ""
    for cmd, extra, note in tries:
        try:
            r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=20,
                               env=dict(os.environ, **(extra or {})), cwd=repo)
        except (OSError, subprocess.TimeoutExpired) as e:
            last = str(e)
            continue
        if r.returncode == 0:
            return cmd, extra, note
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        last = last[0]
    return None, None, ("fastws is not runnable yet (no working `fastws` command and no runnable "
                        f"`python -m fastws`: {last[:200]}): the fastws target was skipped")
