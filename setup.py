"""Builds the Cython extensions in native/ (every native/*.pyx becomes native.<name>)."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(f"native.{pyx.stem}", [str(pyx)], extra_compile_args=["-O3"])
    for pyx in sorted(Path("native").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})
)
