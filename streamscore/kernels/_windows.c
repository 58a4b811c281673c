/* Window aggregation over sparse time tiles, compiled: the hot loop of feature reads.
 *
 * The same computation as the pure-Python fallback in tiles.py (``_window_partial_py``
 * and ``_window_agg_py``), which the property tests hold it to. A bucket is a list
 * [count, declined, amount_sum, amount_sumsq, amount_max, *one set per distinct
 * field], keyed by its bucket index in a dict; a window is the buckets with index in
 * [first, last].
 *
 * Sums stay exact: they are kept in int64 while they fit and carried on in Python
 * ints from the first overflow (sums of squares of large amounts do overflow).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FIXED_FIELDS 5
#define N_SUMS 4 /* count, declined, amount_sum, amount_sumsq */
#define MAX_FIELD 4

typedef struct {
    long long small;
    PyObject *big; /* NULL while the sum fits in small */
} ExactSum;

static int exact_sum_add(ExactSum *sum, PyObject *value)
{
    if (sum->big == NULL) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        long long total;
        if (!overflow && !__builtin_add_overflow(sum->small, v, &total)) {
            sum->small = total;
            return 0;
        }
        sum->big = PyLong_FromLongLong(sum->small);
        if (sum->big == NULL) {
            return -1;
        }
    }
    PyObject *total = PyNumber_Add(sum->big, value);
    if (total == NULL) {
        return -1;
    }
    Py_DECREF(sum->big);
    sum->big = total;
    return 0;
}

static PyObject *exact_sum_value(ExactSum *sum)
{
    if (sum->big != NULL) {
        return Py_NewRef(sum->big);
    }
    return PyLong_FromLongLong(sum->small);
}

/* What a window accumulates. Distinct slots: ``single`` is the only bucket set seen
 * so far (borrowed); ``merged`` a new set, made once a second one arrives. */
typedef struct {
    Py_ssize_t n_distinct;
    Py_ssize_t n_buckets;
    ExactSum sums[N_SUMS];
    PyObject *max; /* borrowed from a bucket */
    PyObject **single;
    PyObject **merged;
} Window;

static int window_init(Window *w, Py_ssize_t n_distinct)
{
    memset(w, 0, sizeof(*w));
    w->n_distinct = n_distinct;
    if (n_distinct > 0) {
        w->single = PyMem_Calloc((size_t)n_distinct, sizeof(PyObject *));
        w->merged = PyMem_Calloc((size_t)n_distinct, sizeof(PyObject *));
        if (w->single == NULL || w->merged == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void window_clear(Window *w)
{
    for (int i = 0; i < N_SUMS; i++) {
        Py_CLEAR(w->sums[i].big);
    }
    for (Py_ssize_t j = 0; j < w->n_distinct; j++) {
        if (w->merged != NULL) {
            Py_CLEAR(w->merged[j]);
        }
    }
    PyMem_Free(w->single);
    PyMem_Free(w->merged);
    w->single = w->merged = NULL;
}

static int window_add(Window *w, PyObject *bucket)
{
    if (!PyList_CheckExact(bucket) || PyList_GET_SIZE(bucket) != FIXED_FIELDS + w->n_distinct) {
        PyErr_Format(PyExc_TypeError, "a bucket must be a list of %zd fields",
                     FIXED_FIELDS + w->n_distinct);
        return -1;
    }
    for (int i = 0; i < N_SUMS; i++) {
        if (exact_sum_add(&w->sums[i], PyList_GET_ITEM(bucket, i)) < 0) {
            return -1;
        }
    }
    PyObject *max = PyList_GET_ITEM(bucket, MAX_FIELD);
    if (w->max == NULL) {
        w->max = max;
    }
    else {
        int greater = PyObject_RichCompareBool(max, w->max, Py_GT);
        if (greater < 0) {
            return -1;
        }
        if (greater) {
            w->max = max;
        }
    }
    for (Py_ssize_t j = 0; j < w->n_distinct; j++) {
        PyObject *values = PyList_GET_ITEM(bucket, FIXED_FIELDS + j);
        if (!PyAnySet_Check(values)) {
            PyErr_SetString(PyExc_TypeError, "a bucket's distinct values must be a set");
            return -1;
        }
        if (w->single[j] == NULL) {
            w->single[j] = values;
            continue;
        }
        if (w->merged[j] == NULL) {
            w->merged[j] = PySet_New(w->single[j]);
            if (w->merged[j] == NULL) {
                return -1;
            }
        }
        PyObject *merged = PyNumber_InPlaceOr(w->merged[j], values);
        if (merged == NULL) {
            return -1;
        }
        Py_DECREF(merged); /* the same set, updated in place */
    }
    w->n_buckets++;
    return 0;
}

/* Add the buckets of ``buckets`` with index in [first, last]. */
static int window_scan(Window *w, PyObject *buckets, long long first, long long last)
{
    if (!PyDict_Check(buckets)) {
        PyErr_SetString(PyExc_TypeError, "buckets must be a dict");
        return -1;
    }
    if (last < first) {
        return 0;
    }
    /* Visit whichever is smaller: the stored buckets, or the window's index range. */
    long long span;
    if (__builtin_sub_overflow(last, first, &span) || PyDict_GET_SIZE(buckets) - 1 <= span) {
        Py_ssize_t pos = 0;
        PyObject *key, *bucket;
        while (PyDict_Next(buckets, &pos, &key, &bucket)) {
            long long index = PyLong_AsLongLong(key);
            if (index == -1 && PyErr_Occurred()) {
                return -1;
            }
            if (first <= index && index <= last && window_add(w, bucket) < 0) {
                return -1;
            }
        }
        return 0;
    }
    for (long long index = first; index <= last; index++) {
        PyObject *key = PyLong_FromLongLong(index);
        if (key == NULL) {
            return -1;
        }
        PyObject *bucket = PyDict_GetItemWithError(buckets, key); /* borrowed */
        Py_DECREF(key);
        if (bucket == NULL) {
            if (PyErr_Occurred()) {
                return -1;
            }
            continue;
        }
        if (window_add(w, bucket) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Fill items[0..4] (new references): the four sums and the max (0 when empty). */
static int window_fixed_items(Window *w, PyObject **items)
{
    for (int i = 0; i < N_SUMS; i++) {
        items[i] = exact_sum_value(&w->sums[i]);
        if (items[i] == NULL) {
            return -1;
        }
    }
    items[MAX_FIELD] = w->max != NULL ? Py_NewRef(w->max) : PyLong_FromLong(0);
    return items[MAX_FIELD] == NULL ? -1 : 0;
}

static int parse_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t offset,
                      long long *first, long long *last, Py_ssize_t *n_distinct)
{
    if (nargs != offset + 4) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", offset + 4, nargs);
        return -1;
    }
    *first = PyLong_AsLongLong(args[offset + 1]);
    if (*first == -1 && PyErr_Occurred()) {
        return -1;
    }
    *last = PyLong_AsLongLong(args[offset + 2]);
    if (*last == -1 && PyErr_Occurred()) {
        return -1;
    }
    *n_distinct = PyLong_AsSsize_t(args[offset + 3]);
    if (*n_distinct == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*n_distinct < 0) {
        PyErr_SetString(PyExc_ValueError, "n_distinct must not be negative");
        return -1;
    }
    return 0;
}

/* Parse (buckets, first, last, n_distinct) from args[offset:], add up the window into
 * w and fill items[0..4]. The caller calls window_clear(w) whatever the outcome. */
static int window_collect(Window *w, PyObject *const *args, Py_ssize_t nargs,
                          Py_ssize_t offset, PyObject **items)
{
    memset(w, 0, sizeof(*w));
    long long first, last;
    Py_ssize_t n_distinct;
    if (parse_args(args, nargs, offset, &first, &last, &n_distinct) < 0
        || window_init(w, n_distinct) < 0 || window_scan(w, args[offset], first, last) < 0) {
        return -1;
    }
    return window_fixed_items(w, items);
}

PyDoc_STRVAR(window_partial_doc,
"window_partial(buckets, first, last, n_distinct)\n--\n\n"
"(count, declined, amount_sum, amount_sumsq, amount_max, [distinct sets]) of the\n"
"buckets with index in [first, last]; the sets are new (safe to keep).");

static PyObject *window_partial(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Window w;
    PyObject *items[FIXED_FIELDS] = {NULL};
    PyObject *sets = NULL, *result = NULL;
    if (window_collect(&w, args, nargs, 0, items) < 0) {
        goto done;
    }
    sets = PyList_New(w.n_distinct);
    if (sets == NULL) {
        goto done;
    }
    for (Py_ssize_t j = 0; j < w.n_distinct; j++) {
        PyObject *set;
        if (w.merged[j] != NULL) {
            set = Py_NewRef(w.merged[j]);
        }
        else {
            set = PySet_New(w.single[j]); /* a copy, or empty when no bucket */
            if (set == NULL) {
                goto done;
            }
        }
        PyList_SET_ITEM(sets, j, set);
    }
    result = PyTuple_Pack(6, items[0], items[1], items[2], items[3], items[4], sets);
done:
    for (int i = 0; i < FIXED_FIELDS; i++) {
        Py_XDECREF(items[i]);
    }
    Py_XDECREF(sets);
    window_clear(&w);
    return result;
}

PyDoc_STRVAR(window_agg_doc,
"window_agg(result_type, buckets, first, last, n_distinct)\n--\n\n"
"result_type(count, declined, amount_sum, amount_sumsq, amount_max, distinct counts)\n"
"over the buckets with index in [first, last]; result_type is a tuple subclass with\n"
"those six fields (WindowAgg).");

static PyObject *window_agg(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Window w;
    PyObject *items[FIXED_FIELDS] = {NULL};
    PyObject *counts = NULL, *result = NULL;
    if (window_collect(&w, args, nargs, 1, items) < 0) {
        goto done;
    }
    PyObject *result_type = args[0]; /* there: window_collect checked nargs */
    if (!PyType_Check(result_type)
        || !PyType_IsSubtype((PyTypeObject *)result_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "result_type must be a tuple subclass");
        goto done;
    }
    counts = PyTuple_New(w.n_distinct);
    if (counts == NULL) {
        goto done;
    }
    for (Py_ssize_t j = 0; j < w.n_distinct; j++) {
        PyObject *set = w.merged[j] != NULL ? w.merged[j] : w.single[j];
        PyObject *count = PyLong_FromSsize_t(set != NULL ? PySet_GET_SIZE(set) : 0);
        if (count == NULL) {
            goto done;
        }
        PyTuple_SET_ITEM(counts, j, count);
    }
    /* What tuple.__new__ does for a subclass: allocate, then fill the items. */
    PyTypeObject *type = (PyTypeObject *)result_type;
    result = type->tp_alloc(type, FIXED_FIELDS + 1);
    if (result == NULL) {
        goto done;
    }
    for (int i = 0; i < FIXED_FIELDS; i++) {
        PyTuple_SET_ITEM(result, i, items[i]);
        items[i] = NULL;
    }
    PyTuple_SET_ITEM(result, FIXED_FIELDS, counts);
    counts = NULL;
done:
    for (int i = 0; i < FIXED_FIELDS; i++) {
        Py_XDECREF(items[i]);
    }
    Py_XDECREF(counts);
    window_clear(&w);
    return result;
}

static PyMethodDef methods[] = {
    {"window_partial", (PyCFunction)(void (*)(void))window_partial, METH_FASTCALL,
     window_partial_doc},
    {"window_agg", (PyCFunction)(void (*)(void))window_agg, METH_FASTCALL, window_agg_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "streamscore.kernels._windows",
    .m_doc = "Window aggregation over sparse time tiles (see tiles.py).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__windows(void)
{
    return PyModuleDef_Init(&module);
}
