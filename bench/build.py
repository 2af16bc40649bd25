"""Compile the C load generator and backend into bench/.build/ when missing or stale."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / ".build"
PROGRAMS = {
    "wsload": ["wsload.c"],
    "wsbackend": ["wsbackend.c"],
}
HEADERS = ["wscommon.h"]
CFLAGS = ["-O2", "-Wall", "-Wno-unused-function"]


class BuildError(RuntimeError):
    pass


def build_all(log=print) -> dict[str, Path]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BuildError("no C compiler found (install gcc: apt-get install -y gcc)")
    BUILD_DIR.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    for name, sources in PROGRAMS.items():
        exe = BUILD_DIR / name
        inputs = [HERE / s for s in sources + HEADERS]
        newest = max(p.stat().st_mtime for p in inputs)
        if not exe.exists() or exe.stat().st_mtime < newest:
            cmd = [cc, *CFLAGS, "-o", str(exe), *[str(HERE / s) for s in sources]]
            log(f"compiling {name}: {' '.join([Path(cc).name, *CFLAGS, '-o', f'bench/.build/{name}', *[f'bench/{s}' for s in sources]])}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"compiling {name} failed:\n{r.stderr}")
        out[name] = exe
    return out
