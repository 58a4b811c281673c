/* Sparse time tiles in compact arrays, compiled: the feature state's buckets and the
 * hot loop of feature reads.
 *
 * ``Tiles`` keeps one entity's non-empty buckets at one resolution as a sorted array
 * of fixed-size records (no Python object per bucket or per number), plus each
 * bucket's distinct values per field (the value itself while it is the only one, a
 * set from the second). It is the Python twin in tiles.py (``PyTiles``, whose
 * docstring says what a bucket and a window are) with the same closed-part cache, and
 * it gives the same integers, sets and floats: the property tests hold the two to
 * each other. Why: a feature read touched a dict, a list and five int objects
 * per bucket; under load they are cold, and each cache miss cost more than the
 * arithmetic.
 *
 * Exact sums without Python ints: amounts are in [0, 2**63) (events are validated to
 * that), so a bucket's or a window's amount sum (fewer than 2**63 events) fits in 127
 * bits, its sum of squares in 190 (a 192-bit accumulator).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

/* Windows over fewer buckets than this are scanned on every call (tiles.py's
 * CACHE_MIN_BUCKETS, which a test holds equal). */
#define CACHE_MIN_BUCKETS 8
/* Distinct fields per tiles: the store has two at most (state.DISTINCT_SOURCES). */
#define MAX_DISTINCT 8
/* Integers up to this convert to double exactly. */
#define EXACT_DOUBLE (1ULL << 53)

typedef unsigned __int128 u128;

/* The bucket records below are packed to 8-byte alignment: left to themselves the
 * 128-bit members would align to 16 and pad a bucket from 72 to 96 bytes. Unaligned
 * 128-bit access is two 64-bit ones; the compiler emits them. */
#pragma pack(push, 8)

typedef struct {
    u128 lo;
    unsigned long long hi;
} U192;

static inline void u192_add128(U192 *a, u128 b)
{
    u128 lo = a->lo + b;
    a->hi += lo < a->lo;
    a->lo = lo;
}

static inline void u192_add(U192 *a, const U192 *b)
{
    u192_add128(a, b->lo);
    a->hi += b->hi;
}

/* The fixed fields of a bucket, or of a window of buckets. Empty: all zero. */
typedef struct {
    long long count;
    long long declined;
    long long max;
    u128 sum;
    U192 sumsq;
} Sums;

typedef struct {
    long long index;
    Sums sums;
} Bucket;

#pragma pack(pop)

static inline void sums_add(Sums *s, const Sums *b)
{
    s->count += b->count;
    s->declined += b->declined;
    if (b->max > s->max) {
        s->max = b->max;
    }
    s->sum += b->sum;
    u192_add(&s->sumsq, &b->sumsq);
}

/* -- Python ints and floats of the sums, as the Python twin computes them --------- */

/* (high << shift) | low as a Python int (public API only: the rare sums beyond 64 bits). */
static PyObject *long_of_parts(PyObject *high, int shift, PyObject *low)
{
    PyObject *bits = high ? PyLong_FromLong(shift) : NULL;
    PyObject *shifted = bits ? PyNumber_Lshift(high, bits) : NULL;
    PyObject *result = shifted && low ? PyNumber_Or(shifted, low) : NULL;
    Py_XDECREF(high);
    Py_XDECREF(bits);
    Py_XDECREF(shifted);
    Py_XDECREF(low);
    return result;
}

static PyObject *long_of_u128(u128 v)
{
    if (v <= (u128)ULLONG_MAX) {
        return PyLong_FromUnsignedLongLong((unsigned long long)v);
    }
    return long_of_parts(PyLong_FromUnsignedLongLong((unsigned long long)(v >> 64)), 64,
                         PyLong_FromUnsignedLongLong((unsigned long long)v));
}

static PyObject *long_of_u192(const U192 *v)
{
    if (v->hi == 0) {
        return long_of_u128(v->lo);
    }
    return long_of_parts(PyLong_FromUnsignedLongLong(v->hi), 128, long_of_u128(v->lo));
}

/* float(int): exact below 2**53; above, Python's correctly rounded conversion. */
static PyObject *float_of_u128(u128 v)
{
    if (v <= EXACT_DOUBLE) {
        return PyFloat_FromDouble((double)v);
    }
    PyObject *integer = long_of_u128(v);
    if (integer == NULL) {
        return NULL;
    }
    double value = PyLong_AsDouble(integer);
    Py_DECREF(integer);
    return value == -1.0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(value);
}

/* a / b as Python's int / int (correctly rounded), or 0.0 when b is 0. Both below
 * 2**53 they are exact doubles and one IEEE division is that rounding. */
static PyObject *ratio_or_zero(u128 a, long long b)
{
    if (b == 0) {
        return PyFloat_FromDouble(0.0);
    }
    if (a <= EXACT_DOUBLE && (unsigned long long)b <= EXACT_DOUBLE) {
        return PyFloat_FromDouble((double)a / (double)b);
    }
    PyObject *num = long_of_u128(a), *den = PyLong_FromLongLong(b), *result = NULL;
    if (num != NULL && den != NULL) {
        result = PyNumber_TrueDivide(num, den);
    }
    Py_XDECREF(num);
    Py_XDECREF(den);
    return result;
}

/* -- the population std, correctly rounded ------------------------------------------ */

/* math.isqrt, for the exact root (set by exec_module). */
static PyObject *isqrt_function = NULL;

/* Bits of the integer root taken before the one rounding: 2 * 53 + 3 (tiles.py). */
#define SQRT_BITS (2 * 53 + 3)

/* The integer square root of n / m, its last bit set when not exact (round-to-odd). */
static PyObject *isqrt_rto(PyObject *n, PyObject *m)
{
    PyObject *quotient = NULL, *root = NULL, *square = NULL, *back = NULL, *result = NULL;
    if ((quotient = PyNumber_FloorDivide(n, m)) &&
        (root = PyObject_CallOneArg(isqrt_function, quotient)) &&
        (square = PyNumber_Multiply(root, root)) && (back = PyNumber_Multiply(square, m))) {
        int exact = PyObject_RichCompareBool(back, n, Py_EQ);
        if (exact >= 0) {
            PyObject *odd = PyLong_FromLong(!exact);
            if (odd != NULL) {
                result = PyNumber_Or(root, odd);
                Py_DECREF(odd);
            }
        }
    }
    Py_XDECREF(quotient);
    Py_XDECREF(root);
    Py_XDECREF(square);
    Py_XDECREF(back);
    return result;
}

/* int.bit_length(), or -1 with an exception set. */
static long long bit_length(PyObject *n)
{
    PyObject *bits = PyObject_CallMethod(n, "bit_length", NULL);
    if (bits == NULL) {
        return -1;
    }
    long long value = PyLong_AsLongLong(bits);
    Py_DECREF(bits);
    return value;
}

/* sqrt(n / m) for Python ints n >= 0, m > 0, correctly rounded: ``sqrt_of_ratio`` in
 * tiles.py, step for step (the root of n / m scaled to carry SQRT_BITS bits, rounded
 * to odd, then one correctly rounded int / int division). */
static PyObject *exact_sqrt_of_ratio(PyObject *n, PyObject *m)
{
    long long n_bits = bit_length(n), m_bits = bit_length(m);
    if (n_bits < 0 || m_bits < 0) {
        return NULL;
    }
    long long excess = n_bits - m_bits - SQRT_BITS;
    long long q = excess >= 0 ? excess / 2 : -((-excess + 1) / 2); /* floor(excess / 2) */
    PyObject *shift = PyLong_FromLongLong(q >= 0 ? 2 * q : -2 * q);
    PyObject *half = PyLong_FromLongLong(q >= 0 ? q : -q);
    PyObject *scaled = NULL, *root = NULL, *one = NULL, *den = NULL, *result = NULL;
    if (shift != NULL && half != NULL) {
        if (q >= 0) {
            PyObject *shifted = NULL;
            if ((scaled = PyNumber_Lshift(m, shift)) && (root = isqrt_rto(n, scaled)) &&
                (shifted = PyNumber_Lshift(root, half))) {
                double value = PyLong_AsDouble(shifted); /* correctly rounded */
                result = value == -1.0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(value);
            }
            Py_XDECREF(shifted);
        } else if ((scaled = PyNumber_Lshift(n, shift)) && (root = isqrt_rto(scaled, m)) &&
                   (one = PyLong_FromLong(1)) && (den = PyNumber_Lshift(one, half))) {
            result = PyNumber_TrueDivide(root, den); /* correctly rounded */
        }
    }
    Py_XDECREF(shift);
    Py_XDECREF(half);
    Py_XDECREF(scaled);
    Py_XDECREF(root);
    Py_XDECREF(one);
    Py_XDECREF(den);
    return result;
}

/* sqrt(n) / count, correctly rounded, from the extended precision of long double (64
 * bits on x86-64): the root and the division are each within half a long double ulp,
 * so the exact value is within two of it, and rounding it to a double rounds the exact
 * value the same way unless a double's rounding boundary (a midpoint between two
 * doubles) lies that close. Then -1.0: too close to call here. */
static double fast_sqrt_over(unsigned long long n, unsigned long long count)
{
#if LDBL_MANT_DIG >= 64
    long double value = sqrtl((long double)n) / (long double)count;
    double rounded = (double)value;
    if (value == (long double)rounded) {
        return rounded; /* two long double ulps from a double: far from a boundary */
    }
    long double neighbour = nextafter(rounded, value > rounded ? INFINITY : -INFINITY);
    long double boundary = ((long double)rounded + neighbour) / 2; /* exact */
    long double ulp = ldexpl(1.0L, ilogbl(value) - (LDBL_MANT_DIG - 1));
    return fabsl(value - boundary) <= 4 * ulp ? -1.0 : rounded;
#else
    (void)n;
    (void)count;
    return -1.0; /* no extra precision: always exactly */
#endif
}

/* The population std from exact integer moments, as ``WindowAgg.amount_std``:
 * sqrt((n * sumsq - sum**2) / n**2), correctly rounded. */
static PyObject *exact_std(const Sums *s)
{
    if (s->count == 0) {
        return PyFloat_FromDouble(0.0);
    }
    u128 n = (u128)s->count, n_sumsq, sum_sq;
    if (s->sumsq.hi == 0 && !__builtin_mul_overflow(n, s->sumsq.lo, &n_sumsq) &&
        !__builtin_mul_overflow(s->sum, s->sum, &sum_sq) &&
        n_sumsq - sum_sq <= (u128)ULLONG_MAX) {
        double value = fast_sqrt_over((unsigned long long)(n_sumsq - sum_sq),
                                      (unsigned long long)s->count);
        if (value >= 0.0) {
            return PyFloat_FromDouble(value);
        }
    }
    PyObject *count = PyLong_FromLongLong(s->count), *sum = long_of_u128(s->sum);
    PyObject *sumsq = long_of_u192(&s->sumsq);
    PyObject *n_sumsq_obj = NULL, *sum_sq_obj = NULL, *numerator = NULL, *n_sq = NULL;
    PyObject *result = NULL;
    if (count && sum && sumsq && (n_sumsq_obj = PyNumber_Multiply(count, sumsq)) &&
        (sum_sq_obj = PyNumber_Multiply(sum, sum)) &&
        (numerator = PyNumber_Subtract(n_sumsq_obj, sum_sq_obj)) &&
        (n_sq = PyNumber_Multiply(count, count))) {
        result = exact_sqrt_of_ratio(numerator, n_sq);
    }
    Py_XDECREF(count);
    Py_XDECREF(sum);
    Py_XDECREF(sumsq);
    Py_XDECREF(n_sumsq_obj);
    Py_XDECREF(sum_sq_obj);
    Py_XDECREF(numerator);
    Py_XDECREF(n_sq);
    return result;
}

/* -- distinct values: the union of a window's bucket slots ------------------------- */

/* A bucket's distinct values of one field are a slot: the value itself while it is
 * the only one (most buckets: a card pays at one merchant per quarter hour), a set
 * once there are two. A set costs over 200 bytes; the value is kept anyway. */

static inline int slot_is_set(PyObject *slot)
{
    return PySet_CheckExact(slot); /* a value is hashable, so never a set */
}

static inline Py_ssize_t slot_size(PyObject *slot)
{
    return slot_is_set(slot) ? PySet_GET_SIZE(slot) : 1;
}

/* Add a slot's values to ``set``. */
static int set_add_slot(PyObject *set, PyObject *slot)
{
    if (!slot_is_set(slot)) {
        return PySet_Add(set, slot);
    }
    PyObject *merged = PyNumber_InPlaceOr(set, slot);
    if (merged == NULL) {
        return -1;
    }
    Py_DECREF(merged); /* the same set, updated in place */
    return 0;
}

/* A slot's values as a set of their own (a new reference); an empty one for NULL. */
static PyObject *set_of_slot(PyObject *slot)
{
    if (slot != NULL && slot_is_set(slot)) {
        return PySet_New(slot);
    }
    PyObject *set = PySet_New(NULL);
    if (set != NULL && slot != NULL && PySet_Add(set, slot) < 0) {
        Py_CLEAR(set);
    }
    return set;
}

/* ``single`` is the only bucket slot seen so far (borrowed); ``merged`` a new set,
 * made once a second one arrives. */
typedef struct {
    Py_ssize_t n_distinct;
    PyObject *single[MAX_DISTINCT];
    PyObject *merged[MAX_DISTINCT];
} Union;

static void union_clear(Union *u)
{
    for (Py_ssize_t j = 0; j < u->n_distinct; j++) {
        Py_CLEAR(u->merged[j]);
        u->single[j] = NULL;
    }
}

static int union_add(Union *u, PyObject *const *slots)
{
    for (Py_ssize_t j = 0; j < u->n_distinct; j++) {
        if (u->single[j] == NULL) {
            u->single[j] = slots[j];
            continue;
        }
        if (u->merged[j] == NULL && (u->merged[j] = set_of_slot(u->single[j])) == NULL) {
            return -1;
        }
        if (set_add_slot(u->merged[j], slots[j]) < 0) {
            return -1;
        }
    }
    return 0;
}

static Py_ssize_t union_size(const Union *u, Py_ssize_t j)
{
    if (u->merged[j] != NULL) {
        return PySet_GET_SIZE(u->merged[j]);
    }
    return u->single[j] != NULL ? slot_size(u->single[j]) : 0;
}

/* The union of slot j as a set of its own (a new reference): safe to keep. */
static PyObject *union_take(Union *u, Py_ssize_t j)
{
    if (u->merged[j] != NULL) {
        PyObject *set = u->merged[j];
        u->merged[j] = NULL;
        return set;
    }
    return set_of_slot(u->single[j]); /* a copy, or empty when no bucket */
}

/* -- the Tiles type ---------------------------------------------------------------- */

/* A window's closed part (every bucket before the current one), aggregated once. */
typedef struct {
    long long window_ms, first, last, version;
    Sums sums;
    PyObject *sets[MAX_DISTINCT]; /* owned: the closed part's unions */
} Closed;

typedef struct {
    PyObject_HEAD
    long long resolution_ms;
    Py_ssize_t n_distinct;
    Py_ssize_t n, capacity;
    Bucket *buckets; /* sorted by index */
    PyObject **sets; /* bucket i's slot j (a value or a set) at [i * n_distinct + j] */
    /* The closed-part cache, one entry per window length, and what invalidates it. */
    Py_ssize_t n_closed;
    Closed *closed;
    long long version;
    int has_closed_upto;
    long long closed_upto; /* highest bucket index inside any cached closed part */
} TilesObject;

static PyTypeObject TilesType;

/* floor(a / b) for b > 0, as Python's // (the bucket of a time). */
static long long floor_div(long long a, long long b)
{
    long long q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* The position of the first bucket with index >= ``index``. */
static Py_ssize_t lower_bound(const TilesObject *self, long long index)
{
    Py_ssize_t lo = 0, hi = self->n;
    if (hi > 0 && self->buckets[hi - 1].index < index) {
        return hi; /* past the newest: the usual case of an add */
    }
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (self->buckets[mid].index < index) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

static PyObject *Tiles_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"resolution_ms", "n_distinct", NULL};
    long long resolution_ms;
    Py_ssize_t n_distinct = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|n", keywords, &resolution_ms,
                                     &n_distinct)) {
        return NULL;
    }
    if (resolution_ms <= 0) {
        PyErr_SetString(PyExc_ValueError, "resolution_ms must be positive");
        return NULL;
    }
    if (n_distinct < 0 || n_distinct > MAX_DISTINCT) {
        PyErr_Format(PyExc_ValueError, "n_distinct must be in 0..%d", MAX_DISTINCT);
        return NULL;
    }
    TilesObject *self = (TilesObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->resolution_ms = resolution_ms;
        self->n_distinct = n_distinct;
    }
    return (PyObject *)self;
}

static void closed_clear(TilesObject *self)
{
    for (Py_ssize_t i = 0; i < self->n_closed; i++) {
        for (Py_ssize_t j = 0; j < self->n_distinct; j++) {
            Py_CLEAR(self->closed[i].sets[j]);
        }
    }
    PyMem_Free(self->closed);
    self->closed = NULL;
    self->n_closed = 0;
}

static void Tiles_dealloc(TilesObject *self)
{
    for (Py_ssize_t i = 0; i < self->n * self->n_distinct; i++) {
        Py_DECREF(self->sets[i]);
    }
    PyMem_Free(self->buckets);
    PyMem_Free(self->sets);
    closed_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int grow(TilesObject *self)
{
    if (self->n < self->capacity) {
        return 0;
    }
    /* 1, 2, 4, 7, 11, 17, ...: most entities hold a handful of buckets, so growth is
     * gentle (memory); the amortized cost of a fold stays constant. */
    Py_ssize_t capacity = self->capacity + self->capacity / 2 + 1;
    Bucket *buckets = PyMem_Realloc(self->buckets, (size_t)capacity * sizeof(Bucket));
    if (buckets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->buckets = buckets;
    if (self->n_distinct > 0) {
        size_t size = (size_t)(capacity * self->n_distinct) * sizeof(PyObject *);
        PyObject **sets = PyMem_Realloc(self->sets, size);
        if (sets == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->sets = sets;
    }
    self->capacity = capacity;
    return 0;
}

/* Add ``value`` to a bucket's slot: a second distinct value turns it into a set. */
static int slot_add(PyObject **slot, PyObject *value)
{
    if (slot_is_set(*slot)) {
        return PySet_Add(*slot, value);
    }
    int same = PyObject_RichCompareBool(*slot, value, Py_EQ);
    if (same != 0) {
        return same < 0 ? -1 : 0;
    }
    PyObject *set = set_of_slot(*slot);
    if (set == NULL || PySet_Add(set, value) < 0) {
        Py_XDECREF(set);
        return -1;
    }
    Py_SETREF(*slot, set);
    return 0;
}

PyDoc_STRVAR(Tiles_add_doc,
"add(time_ms, amount, declined, distinct_values=())\n--\n\n"
"Fold one event in (amount in [0, 2**63), one value per distinct field); returns True\n"
"when it opened a new bucket.");

static PyObject *Tiles_add(TilesObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "add() takes 3 or 4 arguments, got %zd", nargs);
        return NULL;
    }
    long long time_ms = PyLong_AsLongLong(args[0]);
    if (time_ms == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int overflow = 0;
    long long amount = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (amount == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow || amount < 0) {
        /* ValueError, as for any bad entry: the replica counts it and folds on. */
        PyErr_SetString(PyExc_ValueError, "amount must be in [0, 2**63)");
        return NULL;
    }
    int declined = PyObject_IsTrue(args[2]);
    if (declined < 0) {
        return NULL;
    }
    PyObject *values = nargs == 4 ? args[3] : NULL;
    Py_ssize_t n_values = 0;
    if (values != NULL) {
        if (!PyTuple_Check(values)) {
            PyErr_SetString(PyExc_TypeError, "distinct_values must be a tuple");
            return NULL;
        }
        n_values = PyTuple_GET_SIZE(values);
    }
    if (n_values != self->n_distinct) {
        PyErr_Format(PyExc_ValueError, "expected %zd distinct values, got %R", self->n_distinct,
                     values != NULL ? values : Py_None);
        return NULL;
    }
    long long index = floor_div(time_ms, self->resolution_ms);
    if (self->has_closed_upto && index <= self->closed_upto) {
        self->version++; /* a cached closed part changes */
    }
    Py_ssize_t pos = lower_bound(self, index);
    Py_ssize_t nd = self->n_distinct;
    u128 square = (u128)amount * (u128)amount;
    if (pos < self->n && self->buckets[pos].index == index) {
        for (Py_ssize_t j = 0; j < nd; j++) {
            if (slot_add(&self->sets[pos * nd + j], PyTuple_GET_ITEM(values, j)) < 0) {
                return NULL;
            }
        }
        Sums *s = &self->buckets[pos].sums;
        s->count++;
        s->declined += declined;
        s->sum += (u128)amount;
        u192_add128(&s->sumsq, square);
        if (amount > s->max) {
            s->max = amount;
        }
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t j = 0; j < nd; j++) {
        if (PyObject_Hash(PyTuple_GET_ITEM(values, j)) == -1) {
            return NULL; /* unhashable: a set would refuse it too */
        }
    }
    if (grow(self) < 0) {
        return NULL;
    }
    Py_ssize_t after = self->n - pos;
    memmove(&self->buckets[pos + 1], &self->buckets[pos], (size_t)after * sizeof(Bucket));
    if (nd > 0) {
        memmove(&self->sets[(pos + 1) * nd], &self->sets[pos * nd],
                (size_t)(after * nd) * sizeof(PyObject *));
    }
    Bucket *b = &self->buckets[pos];
    memset(b, 0, sizeof(*b));
    b->index = index;
    b->sums.count = 1;
    b->sums.declined = declined;
    b->sums.max = amount;
    b->sums.sum = (u128)amount;
    b->sums.sumsq.lo = square;
    for (Py_ssize_t j = 0; j < nd; j++) {
        self->sets[pos * nd + j] = Py_NewRef(PyTuple_GET_ITEM(values, j));
    }
    self->n++;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(Tiles_expire_doc,
"expire(keep_from_ms)\n--\n\n"
"Drop buckets wholly before ``keep_from_ms``; returns how many were dropped.");

static PyObject *Tiles_expire(TilesObject *self, PyObject *arg)
{
    long long keep_from_ms = PyLong_AsLongLong(arg);
    if (keep_from_ms == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t stale = lower_bound(self, floor_div(keep_from_ms, self->resolution_ms));
    if (stale == 0) {
        return PyLong_FromLong(0);
    }
    Py_ssize_t nd = self->n_distinct;
    for (Py_ssize_t i = 0; i < stale * nd; i++) {
        Py_DECREF(self->sets[i]);
    }
    Py_ssize_t kept = self->n - stale;
    memmove(self->buckets, &self->buckets[stale], (size_t)kept * sizeof(Bucket));
    if (nd > 0) {
        memmove(self->sets, &self->sets[stale * nd], (size_t)(kept * nd) * sizeof(PyObject *));
    }
    self->n = kept;
    if (self->n_closed > 0) {
        self->version++;
    }
    return PyLong_FromSsize_t(stale);
}

/* Add the buckets with index in [first, last] to ``sums`` and ``u``. */
static int scan(const TilesObject *self, long long first, long long last, Sums *sums, Union *u)
{
    for (Py_ssize_t i = lower_bound(self, first); i < self->n; i++) {
        const Bucket *b = &self->buckets[i];
        if (b->index > last) {
            break;
        }
        sums_add(sums, &b->sums);
        if (self->n_distinct > 0 && union_add(u, &self->sets[i * self->n_distinct]) < 0) {
            return -1;
        }
    }
    return 0;
}

/* The closed part [first, last] of the windows of length ``window_ms``: the cached one
 * while still valid, else aggregated now and cached. */
static Closed *closed_part(TilesObject *self, long long window_ms, long long first,
                           long long last)
{
    Closed *entry = NULL;
    for (Py_ssize_t i = 0; i < self->n_closed; i++) {
        if (self->closed[i].window_ms == window_ms) {
            entry = &self->closed[i];
            break;
        }
    }
    if (entry != NULL && entry->first == first && entry->last == last &&
        entry->version == self->version) {
        return entry;
    }
    Sums sums;
    Union u;
    memset(&sums, 0, sizeof(sums));
    memset(&u, 0, sizeof(u));
    u.n_distinct = self->n_distinct;
    PyObject *sets[MAX_DISTINCT] = {NULL};
    int ok = scan(self, first, last, &sums, &u) == 0;
    for (Py_ssize_t j = 0; ok && j < self->n_distinct; j++) {
        ok = (sets[j] = union_take(&u, j)) != NULL;
    }
    union_clear(&u);
    if (ok && entry == NULL) {
        Closed *grown = PyMem_Realloc(self->closed, (size_t)(self->n_closed + 1) * sizeof(Closed));
        if (grown == NULL) {
            PyErr_NoMemory();
            ok = 0;
        }
        else {
            self->closed = grown;
            entry = &grown[self->n_closed++];
            memset(entry, 0, sizeof(*entry));
        }
    }
    if (!ok) {
        for (Py_ssize_t j = 0; j < self->n_distinct; j++) {
            Py_XDECREF(sets[j]);
        }
        return NULL;
    }
    for (Py_ssize_t j = 0; j < self->n_distinct; j++) {
        Py_XSETREF(entry->sets[j], sets[j]);
    }
    entry->window_ms = window_ms;
    entry->first = first;
    entry->last = last;
    entry->version = self->version;
    entry->sums = sums;
    if (!self->has_closed_upto || last > self->closed_upto) {
        self->has_closed_upto = 1;
        self->closed_upto = last;
    }
    return entry;
}

/* How many of a slot's values are not in ``closed``. */
static Py_ssize_t count_new(PyObject *slot, PyObject *closed)
{
    if (!slot_is_set(slot)) {
        int seen = PySet_Contains(closed, slot);
        return seen < 0 ? -1 : !seen;
    }
    PyObject *iterator = PyObject_GetIter(slot), *key;
    if (iterator == NULL) {
        return -1;
    }
    Py_ssize_t fresh = 0;
    while ((key = PyIter_Next(iterator)) != NULL) {
        int seen = PySet_Contains(closed, key);
        Py_DECREF(key);
        if (seen < 0) {
            Py_DECREF(iterator);
            return -1;
        }
        fresh += !seen;
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : fresh;
}

/* The window (b(t) - W/r, b(t)] as of ``t_ms``: its sums and distinct counts. Long
 * windows of tiles holding many buckets add the current bucket to their cached closed
 * part (``PyTiles.window``'s rule). */
static int tiles_window(TilesObject *self, long long t_ms, long long window_ms, Sums *sums,
                        Py_ssize_t *distinct)
{
    long long r = self->resolution_ms;
    if (window_ms <= 0 || window_ms % r != 0) {
        PyErr_Format(PyExc_ValueError, "window %lld ms is not a positive multiple of %lld ms",
                     window_ms, r);
        return -1;
    }
    long long last = floor_div(t_ms, r), first;
    if (__builtin_sub_overflow(last, window_ms / r - 1, &first)) {
        PyErr_SetString(PyExc_OverflowError, "window starts before the earliest time");
        return -1;
    }
    memset(sums, 0, sizeof(*sums));
    Py_ssize_t nd = self->n_distinct;
    if (last - first < CACHE_MIN_BUCKETS || self->n < CACHE_MIN_BUCKETS) {
        Union u;
        memset(&u, 0, sizeof(u));
        u.n_distinct = nd;
        int rc = scan(self, first, last, sums, &u);
        for (Py_ssize_t j = 0; j < nd; j++) {
            distinct[j] = union_size(&u, j);
        }
        union_clear(&u);
        return rc;
    }
    Closed *closed = closed_part(self, window_ms, first, last - 1);
    if (closed == NULL) {
        return -1;
    }
    *sums = closed->sums;
    Py_ssize_t current = lower_bound(self, last);
    int has_current = current < self->n && self->buckets[current].index == last;
    if (has_current) {
        sums_add(sums, &self->buckets[current].sums);
    }
    for (Py_ssize_t j = 0; j < nd; j++) {
        distinct[j] = PySet_GET_SIZE(closed->sets[j]);
        if (has_current) {
            Py_ssize_t fresh = count_new(self->sets[current * nd + j], closed->sets[j]);
            if (fresh < 0) {
                return -1;
            }
            distinct[j] += fresh;
        }
    }
    return 0;
}

static int parse_window_args(PyObject *const *args, Py_ssize_t nargs, long long *t_ms,
                             long long *window_ms)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "expected 2 arguments, got %zd", nargs);
        return -1;
    }
    *t_ms = PyLong_AsLongLong(args[0]);
    if (*t_ms == -1 && PyErr_Occurred()) {
        return -1;
    }
    *window_ms = PyLong_AsLongLong(args[1]);
    return *window_ms == -1 && PyErr_Occurred() ? -1 : 0;
}

PyDoc_STRVAR(Tiles_aggregate_doc,
"aggregate(t_ms, window_ms)\n--\n\n"
"(count, declined, amount_sum, amount_sumsq, amount_max, distinct counts) of the\n"
"buckets in (b(t) - W/r, b(t)]: the fields of a WindowAgg (tiles.Tiles.window).");

static PyObject *Tiles_aggregate(TilesObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long t_ms, window_ms;
    Sums s;
    Py_ssize_t distinct[MAX_DISTINCT];
    if (parse_window_args(args, nargs, &t_ms, &window_ms) < 0 ||
        tiles_window(self, t_ms, window_ms, &s, distinct) < 0) {
        return NULL;
    }
    PyObject *counts = PyTuple_New(self->n_distinct);
    if (counts == NULL) {
        return NULL;
    }
    for (Py_ssize_t j = 0; j < self->n_distinct; j++) {
        PyObject *count = PyLong_FromSsize_t(distinct[j]);
        if (count == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyTuple_SET_ITEM(counts, j, count);
    }
    return Py_BuildValue("(LLNNLN)", s.count, s.declined, long_of_u128(s.sum),
                         long_of_u192(&s.sumsq), s.max, counts);
}

PyDoc_STRVAR(Tiles_buckets_doc,
"The stored buckets as the Python twin keeps them: {index: [count, declined,\n"
"amount_sum, amount_sumsq, amount_max, *distinct sets]} (a new dict and lists; sets of\n"
"two or more values are the live ones: read, do not change).");

static PyObject *Tiles_buckets(TilesObject *self, void *closure)
{
    PyObject *buckets = PyDict_New();
    if (buckets == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->n; i++) {
        const Bucket *b = &self->buckets[i];
        PyObject *row = Py_BuildValue("[LLNNL]", b->sums.count, b->sums.declined,
                                      long_of_u128(b->sums.sum), long_of_u192(&b->sums.sumsq),
                                      b->sums.max);
        PyObject *key = row != NULL ? PyLong_FromLongLong(b->index) : NULL;
        int rc = key != NULL ? 0 : -1;
        for (Py_ssize_t j = 0; rc == 0 && j < self->n_distinct; j++) {
            PyObject *slot = self->sets[i * self->n_distinct + j];
            PyObject *set = slot_is_set(slot) ? Py_NewRef(slot) : set_of_slot(slot);
            rc = set != NULL ? PyList_Append(row, set) : -1;
            Py_XDECREF(set);
        }
        if (rc == 0) {
            rc = PyDict_SetItem(buckets, key, row);
        }
        Py_XDECREF(key);
        Py_XDECREF(row);
        if (rc < 0) {
            Py_DECREF(buckets);
            return NULL;
        }
    }
    return buckets;
}

static Py_ssize_t Tiles_len(TilesObject *self)
{
    return self->n;
}

static PyObject *Tiles_sizeof(TilesObject *self, PyObject *unused)
{
    size_t per_bucket = sizeof(Bucket) + (size_t)self->n_distinct * sizeof(PyObject *);
    size_t size = (size_t)Py_TYPE(self)->tp_basicsize + (size_t)self->capacity * per_bucket +
                  (size_t)self->n_closed * sizeof(Closed);
    return PyLong_FromSize_t(size);
}

static PyMethodDef Tiles_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Tiles_add, METH_FASTCALL, Tiles_add_doc},
    {"expire", (PyCFunction)Tiles_expire, METH_O, Tiles_expire_doc},
    {"aggregate", (PyCFunction)(void (*)(void))Tiles_aggregate, METH_FASTCALL,
     Tiles_aggregate_doc},
    {"__sizeof__", (PyCFunction)Tiles_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Tiles_members[] = {
    {"resolution_ms", T_LONGLONG, offsetof(TilesObject, resolution_ms), READONLY, NULL},
    {"n_distinct", T_PYSSIZET, offsetof(TilesObject, n_distinct), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Tiles_getset[] = {
    {"buckets", (getter)Tiles_buckets, NULL, Tiles_buckets_doc, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Tiles_as_sequence = {
    .sq_length = (lenfunc)Tiles_len,
};

PyDoc_STRVAR(Tiles_doc,
"Tiles(resolution_ms, n_distinct=0)\n--\n\n"
"Non-empty buckets of one entity at one resolution, in compact arrays (tiles.py's\n"
"PyTiles, compiled).");

static PyTypeObject TilesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "streamscore.kernels._windows.Tiles",
    .tp_basicsize = sizeof(TilesObject),
    .tp_dealloc = (destructor)Tiles_dealloc,
    .tp_as_sequence = &Tiles_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = Tiles_doc,
    .tp_methods = Tiles_methods,
    .tp_members = Tiles_members,
    .tp_getset = Tiles_getset,
    .tp_new = Tiles_new,
};

/* -- windowed_values: every window read of one entity, straight into its values dict --
 *
 * Score reads about ten values over four windows per entity: per window, the sums and
 * distinct counts above, then each read as a float, computed as the Python readers
 * compute it (tiles.py, WINDOW_READS), so every value is the same float. */

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

static PyObject *read_value(const Sums *s, const Py_ssize_t *distinct, Py_ssize_t n_distinct,
                            long code, Py_ssize_t slot)
{
    switch (code) {
    case READ_COUNT:
        return PyFloat_FromDouble((double)s->count); /* correctly rounded, as float(int) */
    case READ_DECLINED:
        return PyFloat_FromDouble((double)s->declined);
    case READ_SUM:
        return float_of_u128(s->sum);
    case READ_MAX:
        return PyFloat_FromDouble((double)s->max);
    case READ_MEAN:
        return ratio_or_zero(s->sum, s->count);
    case READ_STD:
        return exact_std(s);
    case READ_DECLINE_RATE:
        return ratio_or_zero((u128)s->declined, s->count);
    case READ_DISTINCT:
        if (slot < 0 || slot >= n_distinct) {
            PyErr_Format(PyExc_ValueError, "distinct slot %zd out of range", slot);
            return NULL;
        }
        return PyFloat_FromDouble((double)distinct[slot]);
    default:
        PyErr_Format(PyExc_ValueError, "unknown read code %ld", code);
        return NULL;
    }
}

/* values[name] = read for each (name, code, slot) of ``reads``. */
static int store_reads(PyObject *values, PyObject *reads, const Sums *s,
                       const Py_ssize_t *distinct, Py_ssize_t n_distinct)
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
        PyObject *value = read_value(s, distinct, n_distinct, code, slot);
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

PyDoc_STRVAR(windowed_values_doc,
"windowed_values(values, tiles, t_ms, plan)\n--\n\n"
"For each (index, window_ms, reads) of ``plan``, aggregate the window of\n"
"``tiles[index]`` (a tuple of compiled Tiles, one per resolution of the entity) as\n"
"of ``t_ms`` and set ``values[name]`` for each (name, code, slot) of ``reads`` (see\n"
"tiles.py, ``windowed_values``).");

static PyObject *windowed_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "expected 4 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *values = args[0], *entity_tiles = args[1], *plan = args[3];
    if (!PyDict_Check(values) || !PyTuple_Check(entity_tiles) || !PyTuple_Check(plan)) {
        PyErr_SetString(PyExc_TypeError, "values must be a dict, tiles and plan tuples");
        return NULL;
    }
    long long t_ms = PyLong_AsLongLong(args[2]);
    if (t_ms == -1 && PyErr_Occurred()) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plan); i++) {
        PyObject *window = PyTuple_GET_ITEM(plan, i);
        if (!PyTuple_Check(window) || PyTuple_GET_SIZE(window) != 3) {
            PyErr_SetString(PyExc_TypeError, "a plan item must be (index, window_ms, reads)");
            return NULL;
        }
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(window, 0));
        if (index == -1 && PyErr_Occurred()) {
            return NULL;
        }
        long long window_ms = PyLong_AsLongLong(PyTuple_GET_ITEM(window, 1));
        if (window_ms == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (index < 0 || index >= PyTuple_GET_SIZE(entity_tiles)) {
            PyErr_Format(PyExc_IndexError, "no tiles at index %zd", index);
            return NULL;
        }
        PyObject *tiles = PyTuple_GET_ITEM(entity_tiles, index); /* borrowed */
        if (!PyObject_TypeCheck(tiles, &TilesType)) {
            PyErr_SetString(PyExc_TypeError, "tiles must be compiled Tiles");
            return NULL;
        }
        TilesObject *t = (TilesObject *)tiles;
        Sums s;
        Py_ssize_t distinct[MAX_DISTINCT];
        if (tiles_window(t, t_ms, window_ms, &s, distinct) < 0 ||
            store_reads(values, PyTuple_GET_ITEM(window, 2), &s, distinct, t->n_distinct) < 0) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"windowed_values", (PyCFunction)(void (*)(void))windowed_values, METH_FASTCALL,
     windowed_values_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    if (PyType_Ready(&TilesType) < 0) {
        return -1;
    }
    if (isqrt_function == NULL) {
        PyObject *math = PyImport_ImportModule("math");
        if (math == NULL) {
            return -1;
        }
        isqrt_function = PyObject_GetAttrString(math, "isqrt");
        Py_DECREF(math);
        if (isqrt_function == NULL) {
            return -1;
        }
    }
    if (PyModule_AddObjectRef(module, "Tiles", (PyObject *)&TilesType) < 0) {
        return -1;
    }
    return PyModule_AddIntConstant(module, "CACHE_MIN_BUCKETS", CACHE_MIN_BUCKETS);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "streamscore.kernels._windows",
    .m_doc = "Sparse time tiles in compact arrays, and feature reads over them (see tiles.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__windows(void)
{
    return PyModuleDef_Init(&module);
}
