# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ModelInfer wire format on the request path: request bytes in, reply bytes out, no protobuf objects.

Building protobuf messages and converting them field by field cost more Python than everything else
the handler does before the model runs. `decode_infer_request` reads the request clients send
(`raw_input_contents`, request parameters of any kind, no typed contents) straight from its bytes and
answers None for anything else (typed contents, tensor parameters, unknown fields, a parameter named
twice or given two values, any mistake), which then goes through
protobuf and `gateway.codec.decode_message`: the reference, and the one place that names mistakes.
So this module never judges a request; it only recognises the well-formed common one.
`encode_infer_response` writes the reply. Tests hold both to protobuf and the reference, field by field.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import operator

import numpy as np

from gateway.datatypes import BY_V2_NAME

# The protocol's datatype name -> (numpy dtype, item size in bytes)
cdef dict _DTYPES = {name: (t.numpy, t.numpy.itemsize) for name, t in BY_V2_NAME.items()}

cdef enum:
    LEN = 2  # wire type of strings, bytes, embedded messages and packed repeated scalars
    VARINT = 0
    FIXED64 = 1
    MAX_RANK = 32  # deeper shapes go to the reference, which explains numpy's limit
    MAX_ELEMENTS_LOG2 = 62


cdef struct Reader:
    const unsigned char* p
    const unsigned char* end


cdef inline bint _varint(Reader* r, uint64_t* out) noexcept nogil:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef unsigned char b
    while r.p < r.end and shift < 64:
        b = r.p[0]
        r.p += 1
        value |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = value
            return True
        shift += 7
    return False


cdef inline bint _varint32(Reader* r, uint64_t* out) noexcept nogil:
    """A tag or a length, as upb reads them: at most 5 bytes and at most 2**32 - 1 (else: malformed)."""
    cdef uint64_t value = 0
    cdef int i
    cdef unsigned char b
    for i in range(5):
        if r.p >= r.end:
            return False
        b = r.p[0]
        r.p += 1
        value |= (<uint64_t>(b & 0x7F)) << (7 * i)
        if b < 0x80:
            out[0] = value
            return (value >> 32) == 0
    return False


cdef inline bint _field(Reader* r, uint64_t* field, uint64_t* wire) noexcept nogil:
    cdef uint64_t tag
    if not _varint32(r, &tag):
        return False
    field[0] = tag >> 3
    wire[0] = tag & 7
    return field[0] != 0


cdef inline bint _take(Reader* r, Reader* sub) noexcept nogil:
    """The length-delimited value at `r` as `sub`; `r` moves past it."""
    cdef uint64_t length
    if not _varint32(r, &length) or length > <uint64_t>(r.end - r.p):
        return False
    sub.p = r.p
    sub.end = r.p + length
    r.p = sub.end
    return True


cdef object _text(Reader* r):
    """The string at `r` (None if it is not UTF-8: protobuf refuses such a string, so the reference must)."""
    try:
        return PyUnicode_DecodeUTF8(<const char*>r.p, r.end - r.p, NULL)
    except UnicodeDecodeError:
        return None


cdef bint _dims(Reader* r, uint64_t wire, list shape):
    """One `shape` field: a packed run of dimensions or a single one (both are valid encodings). False
    as soon as the shape is deeper than MAX_RANK, so a hostile run of millions of dims is not built."""
    cdef Reader packed
    cdef uint64_t dim
    if wire == VARINT:
        if not _varint(r, &dim) or <int64_t>dim < 0 or len(shape) >= MAX_RANK:
            return False
        shape.append(dim)
        return True
    if wire != LEN or not _take(r, &packed):
        return False
    while packed.p < packed.end:
        if not _varint(&packed, &dim) or <int64_t>dim < 0 or len(shape) >= MAX_RANK:
            return False
        shape.append(dim)
    return True


cdef object _input(Reader* r):
    """An InferInputTensor as [name, datatype, shape], or None."""
    cdef Reader value
    cdef uint64_t field, wire
    name = datatype = ""
    cdef list shape = []
    while r.p < r.end:
        if not _field(r, &field, &wire):
            return None
        if field == 3:
            if not _dims(r, wire, shape):
                return None
            continue
        if wire != LEN or not _take(r, &value):
            return None
        if field == 1:
            name = _text(&value)
        elif field == 2:
            datatype = _text(&value)
        else:  # parameters or typed contents: the reference's
            return None
        if name is None or datatype is None:
            return None
    return [name, datatype, shape]


cdef object _output(Reader* r):
    """An InferRequestedOutputTensor's name, or None."""
    cdef Reader value
    cdef uint64_t field, wire
    name = ""
    while r.p < r.end:
        if not _field(r, &field, &wire) or field != 1 or wire != LEN or not _take(r, &value):
            return None
        name = _text(&value)
        if name is None:
            return None
    return name


cdef object _DECLINE = object()  # what a parameter reader answers for a value it leaves to the reference


cdef object _parameter_text(Reader* r):
    """An InferParameter as the text `codec.ParameterReader` makes of it (`str` of the value; None when no
    value is set), or _DECLINE for anything unusual (two values, an unknown kind, a wrong wire type)."""
    cdef Reader value
    cdef uint64_t field, wire, raw
    cdef double real
    cdef int i
    text = None
    cdef bint seen = False
    while r.p < r.end:
        if seen or not _field(r, &field, &wire):  # a second value: protobuf keeps the last, we decline
            return _DECLINE
        seen = True
        if field == 3:
            if wire != LEN or not _take(r, &value):
                return _DECLINE
            text = _text(&value)
            if text is None:
                return _DECLINE
        elif field == 4:
            if wire != FIXED64 or r.end - r.p < 8:
                return _DECLINE
            raw = 0
            for i in range(8):  # little-endian on the wire, whatever this host's order
                raw |= (<uint64_t>r.p[i]) << (8 * i)
            r.p += 8
            memcpy(&real, &raw, 8)
            text = str(real)
        elif field == 1 or field == 2 or field == 5:
            if wire != VARINT or not _varint(r, &raw):
                return _DECLINE
            if field == 1:
                text = "True" if raw else "False"
            elif field == 2:
                text = str(<int64_t>raw)
            else:
                text = str(raw)
        else:
            return _DECLINE
    return text


cdef bint _parameter(Reader* r, dict texts):
    """One entry of the request's `parameters` map into `texts` (name -> text); False to decline."""
    cdef Reader value
    cdef uint64_t field, wire
    key = ""
    text = None
    cdef bint has_key = False, has_value = False
    while r.p < r.end:
        if not _field(r, &field, &wire) or wire != LEN or not _take(r, &value):
            return False
        if field == 1 and not has_key:
            key = _text(&value)
            has_key = True
            if key is None:
                return False
        elif field == 2 and not has_value:
            text = _parameter_text(&value)
            has_value = True
            if text is _DECLINE:
                return False
        else:
            return False
    if key in texts:  # named twice: protobuf keeps the last, we decline
        return False
    texts[key] = text
    return True


cdef object _array(list tensor, bytes raw):
    """The input's array over `raw` (no copy), or None if its datatype or byte count is not right."""
    cdef object found = _DTYPES.get(tensor[1])
    if found is None:
        return None
    dtype, itemsize = found
    cdef list shape = tensor[2]
    cdef uint64_t count = 1
    cdef uint64_t dim
    for d in shape:
        dim = d
        if dim >= (<uint64_t>1 << MAX_ELEMENTS_LOG2) or (dim and count > ((<uint64_t>1 << MAX_ELEMENTS_LOG2) // dim)):
            return None
        count *= dim
    cdef uint64_t size = PyBytes_GET_SIZE(raw)
    if size % <uint64_t>itemsize or count != size // <uint64_t>itemsize:  # no product that could wrap
        return None
    return np.frombuffer(raw, dtype).reshape(shape)


def decode_infer_request(bytes data not None):
    """(model_name, model_version, id, inputs, outputs, datatypes, parameter texts or None) of a common,
    well-formed request; None for any other, which the reference decodes (and refuses, if it must)."""
    cdef Reader r, value
    cdef uint64_t field, wire
    r.p = <const unsigned char*>PyBytes_AS_STRING(data)
    r.end = r.p + PyBytes_GET_SIZE(data)
    model_name = model_version = request_id = ""
    cdef list tensors = [], outputs = [], raw = []
    cdef dict texts = None
    while r.p < r.end:
        if not _field(&r, &field, &wire) or wire != LEN or not _take(&r, &value):
            return None
        if field == 7:
            raw.append(PyBytes_FromStringAndSize(<const char*>value.p, value.end - value.p))
        elif field == 5:
            tensor = _input(&value)
            if tensor is None:
                return None
            tensors.append(tensor)
        elif field == 6:
            name = _output(&value)
            if name is None:
                return None
            outputs.append(name)
        elif field == 1:
            model_name = _text(&value)
        elif field == 2:
            model_version = _text(&value)
        elif field == 3:
            request_id = _text(&value)
        elif field == 4:
            if texts is None:
                texts = {}
            if not _parameter(&value, texts):
                return None
        else:  # a field we do not know
            return None
        if model_name is None or model_version is None or request_id is None:
            return None
    count = len(tensors)
    if not model_name or not count or len(raw) != count:
        return None
    cdef dict inputs = {}, datatypes = {}
    for i in range(count):
        tensor = tensors[i]
        name = tensor[0]
        if name in inputs:
            return None
        try:
            array = _array(tensor, raw[i])
        except ValueError:  # a shape numpy cannot hold
            return None
        if array is None:
            return None
        inputs[name] = array
        datatypes[name] = tensor[1]
    return model_name, model_version, request_id, inputs, outputs, datatypes, texts


# --- encoding -------------------------------------------------------------------------------------

cdef inline Py_ssize_t _varint_size(uint64_t value) noexcept nogil:
    cdef Py_ssize_t size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


cdef inline unsigned char* _put_varint(unsigned char* w, uint64_t value) noexcept nogil:
    while value >= 0x80:
        w[0] = <unsigned char>(value & 0x7F) | 0x80
        value >>= 7
        w += 1
    w[0] = <unsigned char>value
    return w + 1


cdef inline Py_ssize_t _len_size(Py_ssize_t length) noexcept nogil:
    """A length-delimited field with a one-byte tag, as encoded."""
    return 1 + _varint_size(length) + length


cdef inline unsigned char* _put_len(unsigned char* w, unsigned char tag, const char* data, Py_ssize_t length) noexcept nogil:
    w[0] = tag
    w = _put_varint(w + 1, length)
    memcpy(w, data, length)
    return w + length


cdef inline unsigned char* _put_len_header(unsigned char* w, unsigned char tag, Py_ssize_t length) noexcept nogil:
    w[0] = tag
    return _put_varint(w + 1, length)


cdef class _Utf8:
    """A str's UTF-8 bytes, borrowed from the str (valid while it lives)."""
    cdef const char* data
    cdef Py_ssize_t size

    def __cinit__(self, str text):
        self.data = PyUnicode_AsUTF8AndSize(text, &self.size)


cdef inline Py_ssize_t _text_field_size(_Utf8 text) noexcept:
    return _len_size(text.size) if text.size else 0


cdef inline unsigned char* _put_text_field(unsigned char* w, unsigned char tag, _Utf8 text) noexcept:
    return _put_len(w, tag, text.data, text.size) if text.size else w


# Parameter kinds, as InferParameter field tags
cdef enum:
    BOOL_PARAM = 0x08
    STRING_PARAM = 0x1A
    DOUBLE_PARAM = 0x21


cdef class _Parameter:
    """One entry of a `parameters` map: key, and a bool, string or double value."""
    cdef _Utf8 key
    cdef unsigned char kind
    cdef _Utf8 text
    cdef double number
    cdef Py_ssize_t value_size  # the InferParameter message
    cdef Py_ssize_t entry_size  # the map entry message

    def __cinit__(self, str key, unsigned char kind, object value):
        self.key = _Utf8(key)
        self.kind = kind
        if kind == STRING_PARAM:
            self.text = _Utf8(value)
            self.value_size = _len_size(self.text.size)
        elif kind == BOOL_PARAM:
            self.number = 1.0 if value else 0.0
            self.value_size = 2
        else:
            self.number = value
            self.value_size = 9
        self.entry_size = _len_size(self.key.size) + _len_size(self.value_size)

    cdef unsigned char* put(self, unsigned char* w):
        w = _put_len_header(w, 0x22, self.entry_size)  # ModelInferResponse.parameters (4)
        w = _put_len(w, 0x0A, self.key.data, self.key.size)
        w = _put_len_header(w, 0x12, self.value_size)
        if self.kind == STRING_PARAM:
            return _put_len(w, STRING_PARAM, self.text.data, self.text.size)
        if self.kind == BOOL_PARAM:
            w[0] = BOOL_PARAM
            w[1] = 1 if self.number else 0
            return w + 2
        w[0] = DOUBLE_PARAM
        memcpy(w + 1, &self.number, 8)  # little-endian, as protobuf's fixed64 (x86 and arm64 are)
        return w + 9


def encode_infer_response(
    str model_name,
    str model_version,
    str id,
    str request_id,
    object ood_flagged,
    double ood_score,
    str ood_features,
    object outputs,
    bint stream=False,
):
    """A ModelInferResponse's bytes (in a ModelStreamInferResponse's `infer_response` when `stream`):
    names, the `request_id` parameter, the OOD parameters when `ood_flagged` is not None, and each
    output (with `name`, `datatype`, `shape` and `data` attributes) as metadata plus raw bytes."""
    cdef _Utf8 name = _Utf8(model_name), version = _Utf8(model_version), client_id = _Utf8(id)
    cdef list parameters = [_Parameter("request_id", STRING_PARAM, request_id)]
    if ood_flagged is not None:
        parameters.append(_Parameter("ood", BOOL_PARAM, ood_flagged))
        parameters.append(_Parameter("ood_score", DOUBLE_PARAM, ood_score))
        if ood_features:
            parameters.append(_Parameter("ood_features", STRING_PARAM, ood_features))
    cdef Py_ssize_t size = _text_field_size(name) + _text_field_size(version) + _text_field_size(client_id)
    cdef _Parameter parameter
    for parameter in parameters:
        size += _len_size(parameter.entry_size)
    # Per output: its metadata message, and the size of its packed shape
    # Every attribute is read once, here: the writing below uses only these snapshots, so what it writes
    # is exactly what was measured, whatever the outputs' attributes do when read again.
    cdef list metadata = []
    cdef Py_ssize_t tensor_size, dims_size
    cdef _Utf8 tensor_name, datatype
    cdef bytes data
    cdef list dims
    for tensor in outputs:
        tensor_name, datatype = _Utf8(tensor.name), _Utf8(tensor.datatype)
        dims = [operator.index(d) for d in tensor.shape]  # ints only, as protobuf's int64 field
        dims_size = 0
        for d in dims:
            dims_size += _varint_size(<uint64_t><int64_t>d)
        tensor_size = _text_field_size(tensor_name) + _text_field_size(datatype) + (_len_size(dims_size) if dims_size else 0)
        data = tensor.data
        if data is None:
            raise TypeError(f"output {tensor.name!r}: data must be bytes, not None")
        metadata.append((tensor_name, datatype, dims, dims_size, tensor_size, data))
        size += _len_size(tensor_size) + _len_size(PyBytes_GET_SIZE(data))
    cdef Py_ssize_t total = _len_size(size) if stream else size
    result = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(result)
    if stream:
        w = _put_len_header(w, 0x12, size)  # ModelStreamInferResponse.infer_response (2)
    w = _put_text_field(w, 0x0A, name)
    w = _put_text_field(w, 0x12, version)
    w = _put_text_field(w, 0x1A, client_id)
    for parameter in parameters:
        w = parameter.put(w)
    for tensor_name, datatype, dims, dims_size, tensor_size, data in metadata:
        w = _put_len_header(w, 0x2A, tensor_size)  # outputs (5)
        w = _put_text_field(w, 0x0A, tensor_name)
        w = _put_text_field(w, 0x12, datatype)
        if dims_size:
            w = _put_len_header(w, 0x1A, dims_size)
            for d in dims:
                w = _put_varint(w, <uint64_t><int64_t>d)
    for entry in metadata:
        data = entry[5]
        w = _put_len(w, 0x32, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))  # raw_output_contents (6)
    if w != <unsigned char*>PyBytes_AS_STRING(result) + total:  # not an assert: python -O drops those
        raise SystemError("encode_infer_response: wrote a different size than it measured")
    return result
