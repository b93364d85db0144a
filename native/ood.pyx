# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OOD scoring of request rows; `gateway.ood.scoring.reference_scores` is the reference it must equal.

Per row: the Mahalanobis distance to the training mean and the k features with the largest |z-score|.
The quadratic form runs over the upper triangle of the (symmetric) inverse covariance as row axpys into
a preallocated scratch vector (independent accumulators, so the compiler vectorises them without
reassociating sums); the top k are kept by insertion into the caller's output row. No array is
allocated per call: the caller's buffers are written in place. `loadtests/bench_ood.py` measures it
against the reference.
"""

from libc.math cimport INFINITY, fabs, isfinite, sqrt

import numpy as np

cdef double DOUBLE_MAX = 1.7976931348623157e308


cdef inline double _rank(double z) noexcept nogil:
    # A non-finite z (a NaN or infinite input) ranks above every finite one.
    cdef double a = fabs(z)
    return a if a <= DOUBLE_MAX else INFINITY


cdef inline Py_ssize_t _keep_largest(
    Py_ssize_t j, double z, Py_ssize_t filled, Py_ssize_t k, Py_ssize_t* index, double* zs
) noexcept nogil:
    """Insert feature j into the row's top k (by |z| descending, ties by index); return the new fill count."""
    cdef double rank = _rank(z)
    cdef Py_ssize_t pos
    if filled == k and rank <= _rank(zs[k - 1]):
        return filled
    pos = filled if filled < k else k - 1
    while pos > 0 and _rank(zs[pos - 1]) < rank:
        zs[pos] = zs[pos - 1]
        index[pos] = index[pos - 1]
        pos -= 1
    zs[pos] = z
    index[pos] = j
    return filled + 1 if filled < k else k


cdef inline double _quadratic_form(const double* d, const double* inverse, double* product, Py_ssize_t f) noexcept nogil:
    """d' S^-1 d. S^-1 is symmetric, so it is sum_i d_i (S_ii d_i + 2 sum_{j<i} S_ji d_j): half the products.
    product[i] accumulates the inner sum as axpys along the rows' upper triangles (vectorisable as written)."""
    cdef Py_ssize_t i, j
    cdef const double* row
    cdef double dj, q = 0.0
    for i in range(f):
        product[i] = 0.0
    for j in range(f):
        row = &inverse[j * f]
        dj = d[j]
        for i in range(j + 1, f):
            product[i] += row[i] * dj
    for i in range(f):
        q += d[i] * (inverse[i * f + i] * d[i] + 2.0 * product[i])
    return q


cdef class Kernel:
    """A profile's mean, inverse covariance and z-score scale, copied once, with the scratch they need.

    `score` keeps the GIL: the scratch belongs to the instance, so two threads must not run it at once,
    and a call takes microseconds (releasing and retaking the GIL would cost a noticeable part of that).
    """

    cdef double[::1] _mean
    cdef double[:, ::1] _inverse
    cdef double[::1] _scale
    cdef double[::1] _diff
    cdef double[::1] _product
    cdef readonly Py_ssize_t n_features
    cdef readonly Py_ssize_t top_k

    def __cinit__(self, mean, inverse_covariance, scale, Py_ssize_t top_k):
        self._mean = np.array(mean, dtype=np.float64, order="C", ndmin=1)
        self._inverse = np.array(inverse_covariance, dtype=np.float64, order="C", ndmin=2)
        self._scale = np.array(scale, dtype=np.float64, order="C", ndmin=1)
        cdef Py_ssize_t n = self._mean.shape[0]
        if self._inverse.shape[0] != n or self._inverse.shape[1] != n or self._scale.shape[0] != n:
            raise ValueError(
                f"mean has {n} features but inverse_covariance is {self._inverse.shape[0]}x{self._inverse.shape[1]}"
                f" and scale has {self._scale.shape[0]}"
            )
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k {top_k} is not in [1, {n}]")
        self.n_features = n
        self.top_k = top_k
        self._diff = np.zeros(n)
        self._product = np.zeros(n)

    def score(
        self,
        const float[:, ::1] rows not None,
        double[::1] scores not None,
        Py_ssize_t[:, ::1] top_index not None,
        double[:, ::1] top_z not None,
    ) -> float:
        """Fill scores[:n], top_index[:n] and top_z[:n] for the n rows; return the largest score (0.0 for none).

        A row with a NaN or infinite value scores +inf. top_* are ordered by |z| descending, ties by index.
        """
        cdef Py_ssize_t n = rows.shape[0], f = self.n_features, k = self.top_k
        if rows.shape[1] != f:
            raise ValueError(f"rows have {rows.shape[1]} features, the profile has {f}")
        if scores.shape[0] < n or top_index.shape[0] < n or top_z.shape[0] < n:
            raise ValueError(f"outputs hold fewer than {n} rows")
        if top_index.shape[1] != k or top_z.shape[1] != k:
            raise ValueError(f"top_index and top_z must have {k} columns")
        cdef const double* mean = &self._mean[0]
        cdef const double* scale = &self._scale[0]
        cdef const double* inverse = &self._inverse[0, 0]
        cdef double* diff = &self._diff[0]
        cdef double* product = &self._product[0]
        cdef Py_ssize_t r, j, filled
        cdef double d, q, score, largest = 0.0
        cdef bint finite
        for r in range(n):
            finite = True
            filled = 0
            for j in range(f):
                d = rows[r, j] - mean[j]
                diff[j] = d
                finite = finite and isfinite(d)
                filled = _keep_largest(j, d / scale[j], filled, k, &top_index[r, 0], &top_z[r, 0])
            if finite:
                q = _quadratic_form(diff, inverse, product, f)
                score = sqrt(q) if q > 0.0 else 0.0
            else:
                score = INFINITY
            scores[r] = score
            if score > largest:
                largest = score
        return largest
