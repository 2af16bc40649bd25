import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# FASTWS_DEBUG=1 pip install -e .  builds with line tracing, annotated HTML and the debug macro.
DEBUG = os.environ.get("FASTWS_DEBUG", "") not in ("", "0")
macros = [("FASTWS_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
args = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]

extensions = [
    Extension(f"fastws.{name}", [f"fastws/{name}.pyx"], include_dirs=["fastws/includes"],
              define_macros=macros, extra_compile_args=args)
    for name in ("_engine", "_splice", "_http")
]

setup(ext_modules=cythonize(extensions, annotate=DEBUG, compiler_directives={
    "language_level": 3, "embedsignature": True, "boundscheck": False, "wraparound": False,
    "initializedcheck": False, "cdivision": True, "linetrace": DEBUG,
}))
