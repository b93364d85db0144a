# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A log record's msgpack bytes, written in one pass: every request pays for its record before it is
answered, and building the map in Python cost more than the LMDB transaction that stores it.

The bytes are exactly msgpack's (`msgpack.Packer(use_bin_type=True)` of the record's field map, as
`gateway.requestlog.record` defines it): readers decode them with msgpack, and tests compare the two
byte for byte. A value of a type this writer does not know raises TypeError, and the caller packs
that record with msgpack itself.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy


cdef class _Buffer:
    cdef char* data
    cdef Py_ssize_t size
    cdef Py_ssize_t capacity

    def __cinit__(self, Py_ssize_t capacity):
        self.data = <char*>PyMem_Malloc(capacity)
        if self.data == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.size = 0

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef char* reserve(self, Py_ssize_t extra) except NULL:
        cdef Py_ssize_t needed = self.size + extra
        cdef Py_ssize_t capacity = self.capacity
        cdef char* grown
        if needed > capacity:
            while capacity < needed:
                capacity *= 2
            grown = <char*>PyMem_Realloc(self.data, capacity)
            if grown == NULL:
                raise MemoryError()
            self.data, self.capacity = grown, capacity
        return self.data + self.size

    cdef int byte(self, uint8_t value) except -1:
        self.reserve(1)[0] = <char>value
        self.size += 1
        return 0

    cdef int header(self, uint8_t code, uint64_t value, int width) except -1:
        """`code`, then `value` big-endian in `width` bytes."""
        cdef char* w = self.reserve(1 + width)
        cdef int i
        w[0] = <char>code
        for i in range(width):
            w[width - i] = <char>(value & 0xFF)
            value >>= 8
        self.size += 1 + width
        return 0

    cdef int raw(self, const char* data, Py_ssize_t length) except -1:
        memcpy(self.reserve(length), data, length)
        self.size += length
        return 0


cdef int _length(_Buffer out, Py_ssize_t n, uint8_t fix, Py_ssize_t fix_max, uint8_t code8, uint8_t code16, uint8_t code32) except -1:
    """A str, bin, array or map header: the smallest form msgpack uses (code8 0: the kind has none)."""
    if fix and n <= fix_max:
        return out.byte(fix | <uint8_t>n)
    if code8 and n <= 0xFF:
        return out.header(code8, n, 1)
    if n <= 0xFFFF:
        return out.header(code16, n, 2)
    if <uint64_t>n <= 0xFFFFFFFF:
        return out.header(code32, n, 4)
    raise ValueError("msgpack object too large")


cdef int _str(_Buffer out, str text) except -1:
    cdef Py_ssize_t n
    cdef const char* data = PyUnicode_AsUTF8AndSize(text, &n)
    _length(out, n, 0xA0, 31, 0xD9, 0xDA, 0xDB)
    return out.raw(data, n)


cdef int _bin(_Buffer out, bytes data) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    _length(out, n, 0, 0, 0xC4, 0xC5, 0xC6)
    return out.raw(PyBytes_AS_STRING(data), n)


cdef int _int(_Buffer out, object value) except -1:
    cdef int64_t v
    if value < 0:
        v = PyLong_AsLongLong(value)
        if v >= -32:
            return out.byte(<uint8_t>(<int>v & 0xFF))
        if v >= -128:
            return out.header(0xD0, <uint64_t>v, 1)
        if v >= -32768:
            return out.header(0xD1, <uint64_t>v, 2)
        if v >= -2147483648:
            return out.header(0xD2, <uint64_t>v, 4)
        return out.header(0xD3, <uint64_t>v, 8)
    if value > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError("int too big to pack")
    cdef uint64_t u = value
    if u < 128:
        return out.byte(<uint8_t>u)
    if u <= 0xFF:
        return out.header(0xCC, u, 1)
    if u <= 0xFFFF:
        return out.header(0xCD, u, 2)
    if u <= 0xFFFFFFFF:
        return out.header(0xCE, u, 4)
    return out.header(0xCF, u, 8)


cdef int _value(_Buffer out, object value) except -1:
    """One scalar, list or str->str map, as msgpack packs it; TypeError for anything else."""
    cdef double d
    cdef uint64_t bits
    if value is None:
        return out.byte(0xC0)
    if value is True:
        return out.byte(0xC3)
    if value is False:
        return out.byte(0xC2)
    cdef type kind = type(value)
    if kind is str:
        return _str(out, value)
    if kind is int:
        return _int(out, value)
    if kind is bytes:
        return _bin(out, value)
    if isinstance(value, float):  # numpy's float64 too, as msgpack packs it
        d = PyFloat_AS_DOUBLE(value)
        memcpy(&bits, &d, 8)
        return out.header(0xCB, bits, 8)
    if kind is list or kind is tuple:
        _length(out, len(value), 0x90, 15, 0, 0xDC, 0xDD)
        for item in value:
            _value(out, item)
        return 0
    if kind is dict:
        _length(out, len(<dict>value), 0x80, 15, 0, 0xDE, 0xDF)
        for key, item in (<dict>value).items():
            _value(out, key)
            _value(out, item)
        return 0
    raise TypeError(f"cannot pack {kind.__name__}")


def pack_record(object record, tuple fields, frozenset tensor_fields, int version):
    """The msgpack map {field: value, ..., "v": version} of `record`'s `fields`, in that order; the
    fields in `tensor_fields` hold lists of tensors, each packed as [name, datatype, shape, data]."""
    cdef _Buffer out = _Buffer(512)
    _length(out, len(fields) + 1, 0x80, 15, 0, 0xDE, 0xDF)
    for name in fields:
        _str(out, name)
        value = getattr(record, name)
        if name in tensor_fields:
            _length(out, len(value), 0x90, 15, 0, 0xDC, 0xDD)
            for tensor in value:
                out.byte(0x94)  # a fixarray of 4
                _value(out, tensor.name)
                _value(out, tensor.datatype)
                _value(out, tensor.shape)
                _value(out, tensor.data)
        else:
            _value(out, value)
    _str(out, "v")
    _value(out, version)
    return PyBytes_FromStringAndSize(out.data, out.size)
