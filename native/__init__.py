"""Compiled hot paths (Cython). Each module has a pure-Python reference checked by the tests."""
