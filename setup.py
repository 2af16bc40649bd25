import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# FASTWS_TRACE=1 pip install -e .  builds with line tracing (for profilers) and annotated HTML.
TRACE = os.environ.get("FASTWS_TRACE", "") not in ("", "0")
macros = [("CYTHON_TRACE_NOGIL", "1")] if TRACE else []
args = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]

extensions = [
    Extension(f"fastws.{name}", [f"fastws/{name}.pyx"], include_dirs=["fastws/includes"],
              define_macros=macros, extra_compile_args=args)
    for name in ("_engine",)
]

setup(ext_modules=cythonize(extensions, annotate=TRACE, compiler_directives={
    "language_level": 3, "embedsignature": True, "boundscheck": False, "wraparound": False,
    "initializedcheck": False, "cdivision": True, "linetrace": TRACE,
}))
