# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Routing hash and weighted pick for the request path; `router/bucketing.py` is the reference it must equal.

A decision costs one pass over the key's UTF-8 bytes (read in place: `PyUnicode_AsUTF8AndSize` returns
an ASCII string's own buffer), a few multiplies per draw, a scan of a C array of cumulative bounds and a
Python small int for the result: no Python object is created per call. `loadtests/bench_routing.py`
measures it against the reference.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

import os

from router.bucketing import check_split

cdef enum:
    BUCKETS = 10000


cdef inline uint64_t _fnv1a64(const unsigned char* data, Py_ssize_t size) noexcept nogil:
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t i
    for i in range(size):
        h = (h ^ data[i]) * 0x100000001B3ULL
    return h


cdef inline uint64_t _mix(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h


cdef inline uint64_t _hash_str(str key) except? 0:
    cdef Py_ssize_t size
    cdef const char* data = PyUnicode_AsUTF8AndSize(key, &size)
    return _fnv1a64(<const unsigned char*>data, size)


def key_hash(str key not None) -> int:
    """FNV-1a 64 of the key's UTF-8 bytes (as `router.bucketing.key_hash`)."""
    return _hash_str(key)


def bucket(str key not None, uint64_t salt=0) -> int:
    """The key's bucket in [0, 10000) for the draw named by `salt` (as `router.bucketing.bucket`)."""
    return _mix(_hash_str(key) ^ salt) % BUCKETS


cdef class Split:
    """One route's split and shadow rules, compiled once; the same interface as `router.bucketing.ReferenceSplit`."""

    cdef uint32_t* _bounds
    cdef uint32_t* _exclude
    cdef uint32_t* _shadow_bps
    cdef uint64_t* _shadow_salts
    cdef Py_ssize_t _n_shadows
    cdef uint64_t _salt
    cdef uint64_t _rng
    cdef readonly tuple versions
    cdef readonly tuple shadow_versions

    def __cinit__(self, split, uint64_t salt=0, shadows=(), seed=None):
        versions, bounds, shadow_versions = check_split(split, shadows)
        cdef Py_ssize_t n = len(versions), ns = len(shadow_versions), i, j
        self._bounds = <uint32_t*>malloc(n * sizeof(uint32_t))
        self._exclude = <uint32_t*>malloc(n * sizeof(uint32_t))
        self._shadow_bps = <uint32_t*>malloc((ns or 1) * sizeof(uint32_t))
        self._shadow_salts = <uint64_t*>malloc((ns or 1) * sizeof(uint64_t))
        if not (self._bounds and self._exclude and self._shadow_bps and self._shadow_salts):
            raise MemoryError()
        self.versions = versions
        self.shadow_versions = shadow_versions
        self._n_shadows = ns
        self._salt = salt
        for i in range(n):
            self._bounds[i] = bounds[i]
            # A shadow never mirrors a request to the version that already answered it.
            self._exclude[i] = 0
            for j in range(ns):
                if shadow_versions[j] == versions[i]:
                    self._exclude[i] |= 1u << j
        for j in range(ns):
            self._shadow_bps[j] = shadows[j][1]
            self._shadow_salts[j] = shadows[j][2]
        self._rng = int.from_bytes(os.urandom(8), "little") if seed is None else <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)

    def __dealloc__(self):
        free(self._bounds)
        free(self._exclude)
        free(self._shadow_bps)
        free(self._shadow_salts)

    cdef inline Py_ssize_t _index(self, uint32_t b) noexcept nogil:
        # The last bound is 10000 > b, so the scan stops inside the table; splits have a handful of versions,
        # where a linear scan beats a binary search.
        cdef Py_ssize_t i = 0
        while b >= self._bounds[i]:
            i += 1
        return i

    cdef inline uint32_t _draw(self) noexcept nogil:
        # splitmix64: a full-period 64-bit generator, a few cycles per draw.
        self._rng += 0x9E3779B97F4A7C15ULL
        cdef uint64_t z = self._rng
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
        return (z ^ (z >> 31)) % BUCKETS

    def bucket(self, str key not None) -> int:
        return _mix(_hash_str(key) ^ self._salt) % BUCKETS

    def pick_bucket(self, int b) -> str:
        if not 0 <= b < BUCKETS:
            raise ValueError(f"bucket {b} is outside [0, {BUCKETS})")
        return self.versions[self._index(b)]

    def pick(self, str key not None) -> str:
        return self.versions[self._index(_mix(_hash_str(key) ^ self._salt) % BUCKETS)]

    def pick_random(self) -> str:
        return self.versions[self._index(self._draw())]

    def outcome(self, str key not None) -> int:
        cdef uint64_t h = _hash_str(key)
        cdef Py_ssize_t index = self._index(_mix(h ^ self._salt) % BUCKETS), j
        cdef uint32_t mask = 0
        for j in range(self._n_shadows):
            if _mix(h ^ self._shadow_salts[j]) % BUCKETS < self._shadow_bps[j]:
                mask |= 1u << j
        return (index << self._n_shadows) | (mask & ~self._exclude[index])

    def outcome_random(self) -> int:
        cdef Py_ssize_t index = self._index(self._draw()), j
        cdef uint32_t mask = 0
        for j in range(self._n_shadows):
            if self._draw() < self._shadow_bps[j]:
                mask |= 1u << j
        return (index << self._n_shadows) | (mask & ~self._exclude[index])
