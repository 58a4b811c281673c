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
#include <math.h>

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

/* -- windowed_values: every window read of one entity, straight into its values dict --
 *
 * Score reads about ten values over four windows per entity. Going through
 * ``Tiles.window`` and a reader per value cost more in the interpreter than the
 * aggregation itself; this does the same per window: the closed-part cache's
 * ``Tiles.window`` where the cache applies (long windows of busy entities: that logic
 * stays in one place), else the scan above; then each read, with the same Python
 * number operations the readers use (so every value is the same float). */

enum {
    READ_COUNT = 0,
    READ_DECLINED,
    READ_SUM,
    READ_MAX,
    READ_MEAN,
    READ_STD,
    READ_DECLINE_RATE,
    READ_DISTINCT,
};

/* count, declined, sum, sumsq, max (borrowed) and the distinct counts of one window. */
typedef struct {
    PyObject *items[FIXED_FIELDS];
    Py_ssize_t *distinct;
    Py_ssize_t n_distinct;
} WindowValues;

/* a / b for Python ints, or 0.0 when b is 0: the readers' ``a / b if b else 0.0``. */
static PyObject *ratio_or_zero(PyObject *a, PyObject *b)
{
    int nonzero = PyObject_IsTrue(b);
    if (nonzero < 0) {
        return NULL;
    }
    return nonzero ? PyNumber_TrueDivide(a, b) : PyFloat_FromDouble(0.0);
}

/* The population std from exact integer moments, as ``WindowAgg.amount_std``. */
static PyObject *exact_std(PyObject *n, PyObject *sum, PyObject *sumsq)
{
    int nonzero = PyObject_IsTrue(n);
    if (nonzero <= 0) {
        return nonzero < 0 ? NULL : PyFloat_FromDouble(0.0);
    }
    PyObject *result = NULL, *n_sumsq = NULL, *sum_sq = NULL, *numerator = NULL;
    PyObject *n_sq = NULL, *quotient = NULL;
    if ((n_sumsq = PyNumber_Multiply(n, sumsq)) && (sum_sq = PyNumber_Multiply(sum, sum)) &&
        (numerator = PyNumber_Subtract(n_sumsq, sum_sq)) && (n_sq = PyNumber_Multiply(n, n)) &&
        (quotient = PyNumber_TrueDivide(numerator, n_sq))) {
        double variance = PyFloat_AsDouble(quotient);
        if (!(variance == -1.0 && PyErr_Occurred())) {
            result = PyFloat_FromDouble(sqrt(variance));
        }
    }
    Py_XDECREF(n_sumsq);
    Py_XDECREF(sum_sq);
    Py_XDECREF(numerator);
    Py_XDECREF(n_sq);
    Py_XDECREF(quotient);
    return result;
}

static PyObject *as_float(PyObject *integer)
{
    double value = PyLong_AsDouble(integer); /* float(int): correctly rounded */
    if (value == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return PyFloat_FromDouble(value);
}

static PyObject *read_value(const WindowValues *v, long code, Py_ssize_t slot)
{
    PyObject *const *items = v->items;
    switch (code) {
    case READ_COUNT:
        return as_float(items[0]);
    case READ_DECLINED:
        return as_float(items[1]);
    case READ_SUM:
        return as_float(items[2]);
    case READ_MAX:
        return as_float(items[MAX_FIELD]);
    case READ_MEAN:
        return ratio_or_zero(items[2], items[0]);
    case READ_STD:
        return exact_std(items[0], items[2], items[3]);
    case READ_DECLINE_RATE:
        return ratio_or_zero(items[1], items[0]);
    case READ_DISTINCT:
        if (slot < 0 || slot >= v->n_distinct) {
            PyErr_Format(PyExc_ValueError, "distinct slot %zd out of range", slot);
            return NULL;
        }
        return PyFloat_FromDouble((double)v->distinct[slot]);
    default:
        PyErr_Format(PyExc_ValueError, "unknown read code %ld", code);
        return NULL;
    }
}

/* values[name] = read for each (name, code, slot) of ``reads``. */
static int store_reads(PyObject *values, PyObject *reads, const WindowValues *v)
{
    if (!PyTuple_Check(reads)) {
        PyErr_SetString(PyExc_TypeError, "reads must be a tuple");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reads); i++) {
        PyObject *read = PyTuple_GET_ITEM(reads, i);
        if (!PyTuple_Check(read) || PyTuple_GET_SIZE(read) != 3) {
            PyErr_SetString(PyExc_TypeError, "a read must be (name, code, slot)");
            return -1;
        }
        long code = PyLong_AsLong(PyTuple_GET_ITEM(read, 1));
        Py_ssize_t slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(read, 2));
        if ((code == -1 || slot == -1) && PyErr_Occurred()) {
            return -1;
        }
        PyObject *value = read_value(v, code, slot);
        if (value == NULL) {
            return -1;
        }
        int rc = PyDict_SetItem(values, PyTuple_GET_ITEM(read, 0), value);
        Py_DECREF(value);
        if (rc < 0) {
            return -1;
        }
    }
    return 0;
}

/* One window read through ``Tiles.window`` (the closed-part cache applies). */
static int reads_through_method(PyObject *values, PyObject *tiles, PyObject *t_ms,
                                PyObject *window_ms, PyObject *reads)
{
    static PyObject *window_name = NULL;
    if (window_name == NULL && (window_name = PyUnicode_InternFromString("window")) == NULL) {
        return -1;
    }
    PyObject *agg = PyObject_CallMethodObjArgs(tiles, window_name, t_ms, window_ms, NULL);
    if (agg == NULL) {
        return -1;
    }
    int rc = -1;
    WindowValues v = {{NULL}, NULL, 0};
    if (!PyTuple_Check(agg) || PyTuple_GET_SIZE(agg) != FIXED_FIELDS + 1 ||
        !PyTuple_Check(PyTuple_GET_ITEM(agg, FIXED_FIELDS))) {
        PyErr_SetString(PyExc_TypeError, "Tiles.window must return a WindowAgg");
        goto done;
    }
    for (int i = 0; i < FIXED_FIELDS; i++) {
        v.items[i] = PyTuple_GET_ITEM(agg, i);
    }
    PyObject *counts = PyTuple_GET_ITEM(agg, FIXED_FIELDS);
    v.n_distinct = PyTuple_GET_SIZE(counts);
    v.distinct = PyMem_Calloc(v.n_distinct ? (size_t)v.n_distinct : 1, sizeof(Py_ssize_t));
    if (v.distinct == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < v.n_distinct; j++) {
        v.distinct[j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(counts, j));
        if (v.distinct[j] == -1 && PyErr_Occurred()) {
            goto done;
        }
    }
    rc = store_reads(values, reads, &v);
done:
    PyMem_Free(v.distinct);
    Py_DECREF(agg);
    return rc;
}

/* One window read by scanning its buckets here. */
static int reads_by_scan(PyObject *values, PyObject *buckets, long long first, long long last,
                         Py_ssize_t n_distinct, PyObject *reads)
{
    Window w;
    WindowValues v = {{NULL}, NULL, n_distinct};
    int rc = -1;
    memset(&w, 0, sizeof(w));
    if (window_init(&w, n_distinct) < 0 || window_scan(&w, buckets, first, last) < 0 ||
        window_fixed_items(&w, v.items) < 0) {
        goto done;
    }
    v.distinct = PyMem_Calloc(n_distinct ? (size_t)n_distinct : 1, sizeof(Py_ssize_t));
    if (v.distinct == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < n_distinct; j++) {
        PyObject *set = w.merged[j] != NULL ? w.merged[j] : w.single[j];
        v.distinct[j] = set != NULL ? PySet_GET_SIZE(set) : 0;
    }
    rc = store_reads(values, reads, &v);
done:
    for (int i = 0; i < FIXED_FIELDS; i++) {
        Py_XDECREF(v.items[i]);
    }
    PyMem_Free(v.distinct);
    window_clear(&w);
    return rc;
}

/* floor(a / b) for b > 0, as Python's // (the bucket of a time). */
static long long floor_div(long long a, long long b)
{
    long long q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

PyDoc_STRVAR(windowed_values_doc,
"windowed_values(values, tiles_by_resolution, t_ms, plan, cache_min_buckets)\n--\n\n"
"For each (resolution_ms, window_ms, n_distinct, reads) of ``plan``, aggregate the\n"
"window of ``tiles_by_resolution[resolution_ms]`` as of ``t_ms`` and set\n"
"``values[name]`` for each (name, code, slot) of ``reads`` (see tiles.py,\n"
"``windowed_values``). Windows over ``cache_min_buckets`` buckets or more, of tiles\n"
"holding as many, go through ``Tiles.window`` (its closed-part cache).");

static PyObject *windowed_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "expected 5 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *values = args[0], *tiles_by_resolution = args[1], *t_obj = args[2];
    PyObject *plan = args[3];
    if (!PyDict_Check(values) || !PyDict_Check(tiles_by_resolution) || !PyTuple_Check(plan)) {
        PyErr_SetString(PyExc_TypeError, "values and tiles must be dicts, plan a tuple");
        return NULL;
    }
    long long t_ms = PyLong_AsLongLong(t_obj);
    long long cache_min = PyLong_AsLongLong(args[4]);
    if ((t_ms == -1 || cache_min == -1) && PyErr_Occurred()) {
        return NULL;
    }
    static PyObject *buckets_name = NULL;
    if (buckets_name == NULL &&
        (buckets_name = PyUnicode_InternFromString("buckets")) == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plan); i++) {
        PyObject *window = PyTuple_GET_ITEM(plan, i);
        if (!PyTuple_Check(window) || PyTuple_GET_SIZE(window) != 4) {
            PyErr_SetString(PyExc_TypeError,
                            "a plan item must be (resolution_ms, window_ms, n_distinct, reads)");
            return NULL;
        }
        PyObject *r_obj = PyTuple_GET_ITEM(window, 0), *w_obj = PyTuple_GET_ITEM(window, 1);
        long long r = PyLong_AsLongLong(r_obj), window_ms = PyLong_AsLongLong(w_obj);
        Py_ssize_t n_distinct = PyLong_AsSsize_t(PyTuple_GET_ITEM(window, 2));
        if ((r == -1 || window_ms == -1 || n_distinct == -1) && PyErr_Occurred()) {
            return NULL;
        }
        if (r <= 0 || window_ms <= 0 || window_ms % r != 0 || n_distinct < 0) {
            PyErr_Format(PyExc_ValueError, "window %lld ms is not a positive multiple of %lld ms",
                         window_ms, r);
            return NULL;
        }
        PyObject *tiles = PyDict_GetItemWithError(tiles_by_resolution, r_obj); /* borrowed */
        if (tiles == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_KeyError, "no tiles at resolution %lld ms", r);
            }
            return NULL;
        }
        PyObject *reads = PyTuple_GET_ITEM(window, 3);
        PyObject *buckets = PyObject_GetAttr(tiles, buckets_name);
        if (buckets == NULL) {
            return NULL;
        }
        long long last = floor_div(t_ms, r);
        long long first = last - window_ms / r + 1;
        int rc;
        /* Tiles.window's own test for when its closed-part cache applies. */
        if (last - first < cache_min || PyDict_Check(buckets) == 0 ||
            PyDict_GET_SIZE(buckets) < cache_min) {
            rc = reads_by_scan(values, buckets, first, last, n_distinct, reads);
        }
        else {
            rc = reads_through_method(values, tiles, t_obj, w_obj, reads);
        }
        Py_DECREF(buckets);
        if (rc < 0) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"window_partial", (PyCFunction)(void (*)(void))window_partial, METH_FASTCALL,
     window_partial_doc},
    {"window_agg", (PyCFunction)(void (*)(void))window_agg, METH_FASTCALL, window_agg_doc},
    {"windowed_values", (PyCFunction)(void (*)(void))windowed_values, METH_FASTCALL,
     windowed_values_doc},
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
