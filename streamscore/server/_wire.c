/* Score's messages on the wire without protobuf objects: a ScoreRequest's bytes to
 * one flat record of its fields, and a ScoreResponse's fields to its bytes.
 *
 * Under load Score runs with cold caches, and what it costs is mostly how much
 * distinct code and data it touches. Through protobuf a request is a message object,
 * a transaction object made on first access, and a new Python object for every field
 * read (validation reads most of them, Score the rest); the answer is a message
 * copied from a template, a timings object, and a serialization pass. Here a request
 * is one pass over its bytes into a struct sequence whose fields are read like
 * attributes, and an answer one pass writing its bytes.
 *
 * The decoder takes the encodings a protobuf encoder writes: the known fields with
 * their own wire types, in any order and repeated (the last value wins; a repeated
 * transaction merges, as protobuf merges a message), and unknown fields of the
 * varint, 64-bit, length-delimited and 32-bit wire types, which it skips. On anything
 * else (a group, a known field with another wire type, a string that is not UTF-8,
 * truncated or malformed bytes) it answers None and the caller parses the bytes with
 * protobuf, which decides. So the decoder never has to be right about an odd input,
 * only about the inputs it accepts; tests/test_wire.py holds it to protobuf on those.
 *
 * The field numbers are those of proto/streamscore/v1/scoring.proto; the same test
 * checks them against the generated descriptors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ScoreRequest */
#define REQUEST_ID 1
#define REQUEST_TRANSACTION 2
#define REQUEST_INCLUDE_FEATURES 3
/* Transaction: strings 1-5 and 7-9, int64 at 6 and 10 */
#define TXN_AMOUNT_MINOR 6
#define TXN_EVENT_TIME_MS 10
#define TXN_LAST_FIELD 10
/* ScoreResponse */
#define RESPONSE_REQUEST_ID 1
#define RESPONSE_SCORE 2
#define RESPONSE_DECISION 3
#define RESPONSE_MODEL 4
#define RESPONSE_FEATURES 5
#define RESPONSE_DEGRADED 6
#define RESPONSE_TIMINGS 7

enum { WIRE_VARINT = 0, WIRE_I64 = 1, WIRE_LEN = 2, WIRE_I32 = 5 };

/* The record's fields, in its order. */
enum {
    F_REQUEST_ID,
    F_TRANSACTION_ID,
    F_CARD_ID,
    F_MERCHANT_ID,
    F_DEVICE_ID,
    F_IP,
    F_AMOUNT_MINOR,
    F_CURRENCY,
    F_MCC,
    F_COUNTRY,
    F_EVENT_TIME_MS,
    F_INCLUDE_FEATURES,
    F_HAS_TRANSACTION,
    F_ENCODED_SIZE,
    N_FIELDS,
};

/* Transaction field number -> record field (-1: none). */
static const int TXN_FIELD_SLOT[TXN_LAST_FIELD + 1] = {
    -1,        F_TRANSACTION_ID, F_CARD_ID, F_MERCHANT_ID, F_DEVICE_ID, F_IP,
    F_AMOUNT_MINOR, F_CURRENCY,  F_MCC,     F_COUNTRY,     F_EVENT_TIME_MS,
};

static PyStructSequence_Field score_fields_fields[] = {
    {"request_id", NULL},
    {"transaction_id", NULL},
    {"card_id", NULL},
    {"merchant_id", NULL},
    {"device_id", NULL},
    {"ip", NULL},
    {"amount_minor", NULL},
    {"currency", NULL},
    {"mcc", NULL},
    {"country", NULL},
    {"event_time_ms", NULL},
    {"include_features", NULL},
    {"has_transaction", "whether the request has a transaction message at all"},
    {"encoded_size", "the request's size in bytes; no string in it is longer"},
    {NULL, NULL},
};

static PyStructSequence_Desc score_fields_desc = {
    "streamscore.server._wire.ScoreFields",
    "A ScoreRequest's fields, the transaction's flattened in.",
    score_fields_fields,
    N_FIELDS,
};

static PyTypeObject *ScoreFieldsType = NULL;

/* ---- decoding ---- */

typedef struct {
    const uint8_t *p, *end;
} Reader;

/* 1: read; 0: malformed or longer than 10 bytes. */
static int read_varint(Reader *r, uint64_t *out)
{
    uint64_t value = 0;
    for (int shift = 0; shift < 70 && r->p < r->end; shift += 7) {
        uint8_t byte = *r->p++;
        if (shift == 63 && byte > 1) {
            return 0; /* more than 64 bits: protobuf decides */
        }
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* A length-delimited payload: 1 with its bounds, 0 when it runs past the end. */
static int read_length(Reader *r, Reader *payload)
{
    uint64_t length;
    if (!read_varint(r, &length) || length > (uint64_t)(r->end - r->p)) {
        return 0;
    }
    payload->p = r->p;
    payload->end = r->p + length;
    r->p += length;
    return 1;
}

/* Skip an unknown field's value: 1 skipped, 0 a group or malformed. */
static int skip_value(Reader *r, unsigned wire_type)
{
    uint64_t ignored;
    Reader payload;
    switch (wire_type) {
    case WIRE_VARINT:
        return read_varint(r, &ignored);
    case WIRE_I64:
        if (r->end - r->p < 8) {
            return 0;
        }
        r->p += 8;
        return 1;
    case WIRE_LEN:
        return read_length(r, &payload);
    case WIRE_I32:
        if (r->end - r->p < 4) {
            return 0;
        }
        r->p += 4;
        return 1;
    default:
        return 0;
    }
}

/* A tag: 1 with its field number and wire type, 0 malformed. A tag is a varint32:
   protobuf refuses one written in more than 5 bytes (padded with 0x80s), so must this
   decoder, or Score would answer bytes that every other service calls unreadable. */
static int read_tag(Reader *r, uint32_t *field, unsigned *wire_type)
{
    uint64_t tag;
    const uint8_t *start = r->p;
    if (!read_varint(r, &tag) || r->p - start > 5 || tag > UINT32_MAX || (tag >> 3) == 0) {
        return 0;
    }
    *field = (uint32_t)(tag >> 3);
    *wire_type = (unsigned)(tag & 7);
    return 1;
}

/* Set a field of the record, dropping an earlier value (a repeated field). */
static void set_slot(PyObject **slots, int slot, PyObject *value)
{
    Py_XSETREF(slots[slot], value);
}

/* A string field: 1 set, 0 not UTF-8 or malformed, -1 error (raised). */
static int read_string(Reader *r, PyObject **slots, int slot)
{
    Reader payload;
    if (!read_length(r, &payload)) {
        return 0;
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)payload.p, payload.end - payload.p, NULL);
    if (text == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    set_slot(slots, slot, text);
    return 1;
}

/* An int64 field (two's complement in a varint): 1 set, 0 malformed, -1 error. */
static int read_int64(Reader *r, PyObject **slots, int slot)
{
    uint64_t raw;
    if (!read_varint(r, &raw)) {
        return 0;
    }
    PyObject *value = PyLong_FromLongLong((long long)(int64_t)raw);
    if (value == NULL) {
        return -1;
    }
    set_slot(slots, slot, value);
    return 1;
}

/* One Transaction message's fields into the record: 1 read, 0 undecided, -1 error. */
static int read_transaction(Reader *r, PyObject **slots)
{
    while (r->p < r->end) {
        uint32_t field;
        unsigned wire_type;
        if (!read_tag(r, &field, &wire_type)) {
            return 0;
        }
        if (field > TXN_LAST_FIELD) {
            if (!skip_value(r, wire_type)) {
                return 0;
            }
            continue;
        }
        int slot = TXN_FIELD_SLOT[field];
        int read;
        if (field == TXN_AMOUNT_MINOR || field == TXN_EVENT_TIME_MS) {
            if (wire_type != WIRE_VARINT) {
                return 0;
            }
            read = read_int64(r, slots, slot);
        }
        else {
            if (wire_type != WIRE_LEN) {
                return 0;
            }
            read = read_string(r, slots, slot);
        }
        if (read <= 0) {
            return read;
        }
    }
    return 1;
}

/* The request's fields into the record: 1 read, 0 undecided, -1 error (raised). */
static int read_request(Reader *r, PyObject **slots)
{
    while (r->p < r->end) {
        uint32_t field;
        unsigned wire_type;
        if (!read_tag(r, &field, &wire_type)) {
            return 0;
        }
        int read;
        if (field == REQUEST_ID) {
            read = wire_type == WIRE_LEN ? read_string(r, slots, F_REQUEST_ID) : 0;
        }
        else if (field == REQUEST_TRANSACTION) {
            Reader transaction;
            if (wire_type != WIRE_LEN || !read_length(r, &transaction)) {
                return 0;
            }
            Py_INCREF(Py_True);
            set_slot(slots, F_HAS_TRANSACTION, Py_True);
            read = read_transaction(&transaction, slots);
        }
        else if (field == REQUEST_INCLUDE_FEATURES) {
            uint64_t flag;
            if (wire_type != WIRE_VARINT || !read_varint(r, &flag)) {
                return 0;
            }
            PyObject *value = flag ? Py_True : Py_False;
            Py_INCREF(value);
            set_slot(slots, F_INCLUDE_FEATURES, value);
            read = 1;
        }
        else {
            read = skip_value(r, wire_type);
        }
        if (read <= 0) {
            return read;
        }
    }
    return 1;
}

PyDoc_STRVAR(decode_score_request_doc,
             "decode_score_request(data, /)\n--\n\n"
             "A ScoreRequest's bytes as ScoreFields, or None where protobuf must decide "
             "(an encoding this decoder does not take, or bytes that are not a message).");

static PyObject *decode_score_request(PyObject *module, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *slots[N_FIELDS] = {NULL};
    Reader reader = {(const uint8_t *)view.buf, (const uint8_t *)view.buf + view.len};
    int read = read_request(&reader, slots);
    PyObject *size = read > 0 ? PyLong_FromSsize_t(view.len) : NULL;
    PyBuffer_Release(&view);
    PyObject *result = NULL;
    if (read > 0 && size != NULL) {
        slots[F_ENCODED_SIZE] = size;
        size = NULL;
        result = PyStructSequence_New(ScoreFieldsType);
    }
    for (int i = 0; result != NULL && i < N_FIELDS; i++) {
        PyObject *value = slots[i];
        slots[i] = NULL;
        if (value == NULL) {
            /* proto3's defaults: "" and 0 are the interpreter's shared objects;
             * event_time_ms has presence (0 is a time): None when not set */
            if (i == F_INCLUDE_FEATURES || i == F_HAS_TRANSACTION) {
                value = Py_NewRef(Py_False);
            }
            else if (i == F_EVENT_TIME_MS) {
                value = Py_NewRef(Py_None);
            }
            else if (i == F_AMOUNT_MINOR) {
                value = PyLong_FromLong(0);
            }
            else {
                value = PyUnicode_New(0, 0);
            }
            if (value == NULL) {
                Py_CLEAR(result);
                break;
            }
        }
        PyStructSequence_SET_ITEM(result, i, value);
    }
    for (int i = 0; i < N_FIELDS; i++) {
        Py_XDECREF(slots[i]);
    }
    Py_XDECREF(size);
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

/* ---- encoding ---- */

static Py_ssize_t varint_size(uint64_t value)
{
    Py_ssize_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

static uint8_t *write_varint(uint8_t *out, uint64_t value)
{
    while (value >= 0x80) {
        *out++ = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    *out++ = (uint8_t)value;
    return out;
}

static uint8_t *write_tag(uint8_t *out, uint32_t field, unsigned wire_type)
{
    return write_varint(out, ((uint64_t)field << 3) | wire_type);
}

static uint8_t *write_double(uint8_t *out, double value)
{
    uint64_t bits;
    memcpy(&bits, &value, 8);
    for (int i = 0; i < 8; i++) {
        *out++ = (uint8_t)(bits >> (8 * i));
    }
    return out;
}

static uint8_t *write_bytes(uint8_t *out, uint32_t field, const char *data, Py_ssize_t size)
{
    out = write_tag(out, field, WIRE_LEN);
    out = write_varint(out, (uint64_t)size);
    memcpy(out, data, (size_t)size);
    return out + size;
}

/* A length-delimited field's whole size: tag, length, payload. */
static Py_ssize_t len_field_size(Py_ssize_t payload)
{
    return 1 + varint_size((uint64_t)payload) + payload;
}

/* An int64 or enum as protobuf writes it: negative values sign-extended to 64 bits. */
static uint64_t as_varint(long long value)
{
    return (uint64_t)(int64_t)value;
}

/* A float's or an int's value, read without running any Python code (the encoder
 * checks the type; numpy's float64 is a float). */
static double feature_value(PyObject *value)
{
    return PyFloat_Check(value) ? PyFloat_AS_DOUBLE(value) : PyLong_AsDouble(value);
}

#define N_TIMINGS 4 /* queue_us, features_us, model_us, total_us: Timings fields 1-4 */

PyDoc_STRVAR(encode_score_response_doc,
             "encode_score_response(request_id, score, decision, model, degraded, features, "
             "queue_us, features_us, model_us, total_us, /)\n--\n\n"
             "A ScoreResponse's bytes, as protobuf writes them (its map entries in the "
             "dict's order). ``model``: the encoded ModelRef; ``degraded``: a tuple of "
             "reasons; ``features``: a dict of str to float (or int), or None.");

static PyObject *encode_score_response(PyObject *module, PyObject *const *args,
                                       Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "encode_score_response takes 10 arguments");
        return NULL;
    }
    PyObject *request_id = args[0], *model = args[3], *degraded = args[4], *features = args[5];
    if (!PyUnicode_Check(request_id) || !PyBytes_Check(model) || !PyTuple_Check(degraded) ||
        (features != Py_None && !PyDict_Check(features))) {
        PyErr_SetString(PyExc_TypeError,
                        "request_id must be str, model bytes, degraded a tuple and features "
                        "a dict or None");
        return NULL;
    }
    double score = PyFloat_AsDouble(args[1]);
    if (score == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    long long decision = PyLong_AsLongLong(args[2]);
    if (decision == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long timings[N_TIMINGS];
    for (int i = 0; i < N_TIMINGS; i++) {
        timings[i] = PyLong_AsLongLong(args[6 + i]);
        if (timings[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    Py_ssize_t id_size;
    const char *id = PyUnicode_AsUTF8AndSize(request_id, &id_size);
    if (id == NULL) {
        return NULL;
    }
    uint64_t score_bits;
    memcpy(&score_bits, &score, 8);

    /* Sizes first, then one pass writing into the bytes object. */
    Py_ssize_t size = id_size ? len_field_size(id_size) : 0;
    size += score_bits ? 9 : 0;
    size += decision ? 1 + varint_size(as_varint(decision)) : 0;
    size += len_field_size(PyBytes_GET_SIZE(model));
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    if (features != Py_None) {
        while (PyDict_Next(features, &pos, &key, &value)) {
            Py_ssize_t key_size;
            if (!PyUnicode_Check(key) || PyUnicode_AsUTF8AndSize(key, &key_size) == NULL) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_TypeError, "feature names must be str");
                }
                return NULL;
            }
            /* Floats and ints only: converting anything else could run Python code
             * that changes the dict between this pass and the writing one. */
            if ((!PyFloat_Check(value) && !PyLong_Check(value)) ||
                (feature_value(value) == -1.0 && PyErr_Occurred())) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_TypeError, "feature values must be float or int");
                }
                return NULL;
            }
            size += len_field_size(len_field_size(key_size) + 9);
        }
    }
    Py_ssize_t n_degraded = PyTuple_GET_SIZE(degraded);
    Py_ssize_t degraded_size = 0;
    for (Py_ssize_t i = 0; i < n_degraded; i++) {
        long long reason = PyLong_AsLongLong(PyTuple_GET_ITEM(degraded, i));
        if (reason == -1 && PyErr_Occurred()) {
            return NULL;
        }
        degraded_size += varint_size(as_varint(reason));
    }
    size += n_degraded ? len_field_size(degraded_size) : 0;
    Py_ssize_t timings_size = 0;
    for (int i = 0; i < N_TIMINGS; i++) {
        timings_size += timings[i] ? 1 + varint_size(as_varint(timings[i])) : 0;
    }
    size += len_field_size(timings_size);

    PyObject *encoded = PyBytes_FromStringAndSize(NULL, size);
    if (encoded == NULL) {
        return NULL;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(encoded);
    if (id_size) {
        out = write_bytes(out, RESPONSE_REQUEST_ID, id, id_size);
    }
    if (score_bits) {
        out = write_tag(out, RESPONSE_SCORE, WIRE_I64);
        out = write_double(out, score);
    }
    if (decision) {
        out = write_tag(out, RESPONSE_DECISION, WIRE_VARINT);
        out = write_varint(out, as_varint(decision));
    }
    out = write_bytes(out, RESPONSE_MODEL, PyBytes_AS_STRING(model), PyBytes_GET_SIZE(model));
    pos = 0;
    if (features != Py_None) {
        while (PyDict_Next(features, &pos, &key, &value)) {
            Py_ssize_t key_size;
            const char *name = PyUnicode_AsUTF8AndSize(key, &key_size); /* cached above */
            out = write_tag(out, RESPONSE_FEATURES, WIRE_LEN);
            out = write_varint(out, (uint64_t)(len_field_size(key_size) + 9));
            out = write_bytes(out, 1, name, key_size);
            out = write_tag(out, 2, WIRE_I64);
            out = write_double(out, feature_value(value)); /* checked above */
        }
    }
    if (n_degraded) {
        out = write_tag(out, RESPONSE_DEGRADED, WIRE_LEN);
        out = write_varint(out, (uint64_t)degraded_size);
        for (Py_ssize_t i = 0; i < n_degraded; i++) {
            out = write_varint(out, as_varint(PyLong_AsLongLong(PyTuple_GET_ITEM(degraded, i))));
        }
    }
    out = write_tag(out, RESPONSE_TIMINGS, WIRE_LEN);
    out = write_varint(out, (uint64_t)timings_size);
    for (int i = 0; i < N_TIMINGS; i++) {
        if (timings[i]) {
            out = write_tag(out, (uint32_t)(1 + i), WIRE_VARINT);
            out = write_varint(out, as_varint(timings[i]));
        }
    }
    if ((char *)out != PyBytes_AS_STRING(encoded) + size) {
        /* cannot happen (no Python code runs between the passes); never wrong bytes */
        Py_DECREF(encoded);
        PyErr_SetString(PyExc_RuntimeError, "features changed while encoding");
        return NULL;
    }
    return encoded;
}

static PyMethodDef methods[] = {
    {"decode_score_request", (PyCFunction)decode_score_request, METH_O,
     decode_score_request_doc},
    {"encode_score_response", (PyCFunction)(void (*)(void))encode_score_response,
     METH_FASTCALL, encode_score_response_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    if (ScoreFieldsType == NULL) {
        ScoreFieldsType = PyStructSequence_NewType(&score_fields_desc);
        if (ScoreFieldsType == NULL) {
            return -1;
        }
    }
    return PyModule_AddObjectRef(module, "ScoreFields", (PyObject *)ScoreFieldsType);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "streamscore.server._wire",
    .m_doc = "Score's request and response on the wire without protobuf objects (see wire.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__wire(void)
{
    return PyModuleDef_Init(&module);
}
