/* A small dense network evaluated in C, one row at a time: the model call of a
 * latency-bound server with a small MLP.
 *
 * onnxruntime spends about 10 us of fixed cost on every run (feeds, the executor,
 * allocations) and three to four times that when the server's other work has evicted
 * its state from the caches between requests, for a model whose arithmetic is a
 * thousand multiply-adds. A ``Program`` is the same graph as a short list of steps
 * over per-row scratch registers; kernels/dense.py translates an ONNX graph into one
 * (and refuses graphs it cannot translate exactly), and the backend checks it against
 * onnxruntime on sample rows before using it.
 *
 * A step is a tuple of ints: (code, dst, a, b, width, in_width). Operands a and b name
 * a register (>= 0) or a constant (-1 - index into the constants). Constants are
 * float32 slices of one buffer, given as (offset, length); a binary step broadcasts a
 * constant of length 1 over the row. GEMM reads register a (in_width wide) and writes
 * width outputs: dst = a @ W + bias, with W stored (in_width, width) row-major so the
 * inner loop runs over outputs, which the compiler vectorises without reassociating
 * sums; b is W, and the bias is the constant in the step's seventh int, or 0 for none
 * (0 names the input register, never a bias).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

enum {
    OP_SIGN = 0,
    OP_ABS,
    OP_LOG,
    OP_EXP,
    OP_RELU,
    OP_SIGMOID,
    OP_NEG,
    OP_TANH,
    OP_SQRT,
    OP_ADD,
    OP_SUB,
    OP_MUL,
    OP_DIV,
    OP_GEMM,
    OP_LAST = OP_GEMM,
};

/* Rows per call above which the GIL is released while computing. */
#define RELEASE_GIL_ROWS 16

typedef struct {
    int code, dst, a, b, width, in_width, bias;
} Step;

typedef struct {
    Py_ssize_t offset, length;
} Constant;

typedef struct {
    PyObject_HEAD
    Step *steps;
    Py_ssize_t n_steps;
    Constant *constants;
    Py_ssize_t n_constants;
    float *values; /* all constants, one buffer */
    Py_ssize_t *register_offset;
    Py_ssize_t n_registers;
    Py_ssize_t scratch_floats; /* per row, all registers */
    Py_ssize_t n_inputs;
    int output; /* register holding the one score */
} Program;

static void program_dealloc(Program *self)
{
    PyMem_Free(self->steps);
    PyMem_Free(self->constants);
    PyMem_Free(self->values);
    PyMem_Free(self->register_offset);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int read_ints(PyObject *seq, int *out, Py_ssize_t n, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd ints", what, n);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v < INT_MIN || v > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: %ld out of range", what, v);
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (int)v;
    }
    Py_DECREF(fast);
    return 0;
}

/* Width of an operand: a register's, or a constant's length. */
static Py_ssize_t operand_width(Program *p, int operand, Py_ssize_t *widths)
{
    if (operand >= 0) {
        return operand < p->n_registers ? widths[operand] : -1;
    }
    Py_ssize_t c = -1 - (Py_ssize_t)operand;
    return c < p->n_constants ? p->constants[c].length : -1;
}

/* Every index and width checked once here, so run() trusts them. */
static int check_steps(Program *p, Py_ssize_t *widths)
{
    for (Py_ssize_t i = 0; i < p->n_steps; i++) {
        Step *s = &p->steps[i];
        if (s->code < 0 || s->code > OP_LAST) {
            PyErr_Format(PyExc_ValueError, "step %zd: unknown code %d", i, s->code);
            return -1;
        }
        if (s->dst <= 0 || s->dst >= p->n_registers || widths[s->dst] != s->width ||
            s->width < 1) {
            PyErr_Format(PyExc_ValueError, "step %zd: bad destination register", i);
            return -1;
        }
        if (s->dst == s->a || (s->code >= OP_ADD && s->dst == s->b)) {
            PyErr_Format(PyExc_ValueError, "step %zd: writes a register it reads", i);
            return -1;
        }
        Py_ssize_t wa = operand_width(p, s->a, widths);
        if (s->code == OP_GEMM) {
            Py_ssize_t ww = operand_width(p, s->b, widths);
            Py_ssize_t wb = s->bias == 0 ? 0 : operand_width(p, s->bias, widths);
            if (s->a < 0 || wa != s->in_width || s->b >= 0 ||
                ww != (Py_ssize_t)s->in_width * s->width || s->bias > 0 ||
                (s->bias != 0 && wb != s->width && wb != 1)) {
                PyErr_Format(PyExc_ValueError, "step %zd: bad GEMM operands", i);
                return -1;
            }
        } else if (s->code >= OP_ADD) {
            Py_ssize_t wb = operand_width(p, s->b, widths);
            int a_ok = wa == s->width || (s->a < 0 && wa == 1);
            int b_ok = wb == s->width || (s->b < 0 && wb == 1);
            if (!a_ok || !b_ok) {
                PyErr_Format(PyExc_ValueError, "step %zd: operand widths do not match", i);
                return -1;
            }
        } else if (s->a < 0 || wa != s->width) {
            PyErr_Format(PyExc_ValueError, "step %zd: bad operand", i);
            return -1;
        }
    }
    return 0;
}

static int program_init(Program *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"steps", "constants", "values", "widths", "output", NULL};
    PyObject *steps, *constants, *widths_seq;
    Py_buffer values;
    int output;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOy*Oi", kwlist, &steps, &constants,
                                     &values, &widths_seq, &output)) {
        return -1;
    }
    int rc = -1;
    if (self->steps != NULL) {
        PyErr_SetString(PyExc_TypeError, "Program is already initialised");
        PyBuffer_Release(&values);
        return -1;
    }
    PyObject *steps_fast = NULL, *constants_fast = NULL, *widths_fast = NULL;
    Py_ssize_t *widths = NULL;
    if (values.len % sizeof(float) != 0) {
        PyErr_SetString(PyExc_ValueError, "values: not a float32 buffer");
        goto done;
    }
    steps_fast = PySequence_Fast(steps, "steps: expected a sequence");
    constants_fast = PySequence_Fast(constants, "constants: expected a sequence");
    widths_fast = PySequence_Fast(widths_seq, "widths: expected a sequence");
    if (steps_fast == NULL || constants_fast == NULL || widths_fast == NULL) {
        goto done;
    }
    self->n_steps = PySequence_Fast_GET_SIZE(steps_fast);
    self->n_constants = PySequence_Fast_GET_SIZE(constants_fast);
    self->n_registers = PySequence_Fast_GET_SIZE(widths_fast);
    self->steps = PyMem_Calloc(self->n_steps ? self->n_steps : 1, sizeof(Step));
    self->constants = PyMem_Calloc(self->n_constants ? self->n_constants : 1, sizeof(Constant));
    self->values = PyMem_Malloc(values.len ? (size_t)values.len : sizeof(float));
    self->register_offset = PyMem_Calloc(self->n_registers ? self->n_registers : 1,
                                         sizeof(Py_ssize_t));
    widths = PyMem_Calloc(self->n_registers ? self->n_registers : 1, sizeof(Py_ssize_t));
    if (!self->steps || !self->constants || !self->values || !self->register_offset ||
        !widths) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(self->values, values.buf, values.len);
    Py_ssize_t n_values = values.len / (Py_ssize_t)sizeof(float);
    for (Py_ssize_t i = 0; i < self->n_constants; i++) {
        int pair[2];
        if (read_ints(PySequence_Fast_GET_ITEM(constants_fast, i), pair, 2,
                      "constants: expected (offset, length)") < 0) {
            goto done;
        }
        if (pair[0] < 0 || pair[1] < 1 || pair[0] + (Py_ssize_t)pair[1] > n_values) {
            PyErr_Format(PyExc_ValueError, "constant %zd lies outside values", i);
            goto done;
        }
        self->constants[i].offset = pair[0];
        self->constants[i].length = pair[1];
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < self->n_registers; i++) {
        Py_ssize_t w = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(widths_fast, i));
        if (w == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (w < 1) {
            PyErr_Format(PyExc_ValueError, "register %zd: width %zd", i, w);
            goto done;
        }
        widths[i] = w;
        self->register_offset[i] = total;
        total += w;
    }
    if (self->n_registers < 2) {
        PyErr_SetString(PyExc_ValueError, "a program needs an input and an output register");
        goto done;
    }
    self->scratch_floats = total;
    self->n_inputs = widths[0];
    for (Py_ssize_t i = 0; i < self->n_steps; i++) {
        int ints[7];
        if (read_ints(PySequence_Fast_GET_ITEM(steps_fast, i), ints, 7,
                      "steps: expected (code, dst, a, b, width, in_width, bias)") < 0) {
            goto done;
        }
        Step s = {ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6]};
        self->steps[i] = s;
    }
    if (check_steps(self, widths) < 0) {
        goto done;
    }
    if (output <= 0 || output >= self->n_registers || widths[output] != 1) {
        PyErr_SetString(PyExc_ValueError, "output: not a register one value wide");
        goto done;
    }
    self->output = output;
    rc = 0;
done:
    PyBuffer_Release(&values);
    Py_XDECREF(steps_fast);
    Py_XDECREF(constants_fast);
    Py_XDECREF(widths_fast);
    PyMem_Free(widths);
    return rc;
}

static inline const float *operand(const Program *p, float *row, int operand)
{
    if (operand >= 0) {
        return row + p->register_offset[operand];
    }
    return p->values + p->constants[-1 - operand].offset;
}

/* Each op is its own loop (the switch outside it), so the compiler vectorises the
 * loops it can; dst is always a register of its own (check_steps), hence restrict. */
#define EACH(expr)                                                                           \
    for (int j = 0; j < w; j++) {                                                            \
        const float x = a[j];                                                                \
        dst[j] = (expr);                                                                     \
    }                                                                                        \
    return

static inline float sigmoid(float x)
{
    if (x >= 0.0f) {
        return 1.0f / (1.0f + expf(-x));
    }
    const float e = expf(x); /* no overflow for large negative x */
    return e / (1.0f + e);
}

static void run_unary(int code, float *restrict dst, const float *restrict a, int w)
{
    switch (code) {
    case OP_SIGN:
        EACH(x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x));
    case OP_ABS:
        EACH(fabsf(x));
    case OP_LOG:
        EACH(logf(x));
    case OP_EXP:
        EACH(expf(x));
    case OP_RELU:
        EACH(x > 0.0f ? x : 0.0f);
    case OP_SIGMOID:
        EACH(sigmoid(x));
    case OP_NEG:
        EACH(-x);
    case OP_TANH:
        EACH(tanhf(x));
    default:
        EACH(sqrtf(x)); /* OP_SQRT */
    }
}

#define PAIRS(op)                                                                            \
    if (a_step && b_step) {                                                                  \
        for (int j = 0; j < w; j++) {                                                        \
            dst[j] = a[j] op b[j];                                                           \
        }                                                                                    \
    } else if (a_step) {                                                                     \
        const float y = b[0];                                                                \
        for (int j = 0; j < w; j++) {                                                        \
            dst[j] = a[j] op y;                                                              \
        }                                                                                    \
    } else {                                                                                 \
        const float x = a[0];                                                                \
        for (int j = 0; j < w; j++) {                                                        \
            dst[j] = x op b[j * b_step];                                                     \
        }                                                                                    \
    }                                                                                        \
    return

/* a_step, b_step: 1 for a full row, 0 for one value broadcast over it. */
static void run_binary(int code, float *restrict dst, const float *a, int a_step,
                       const float *b, int b_step, int w)
{
    switch (code) {
    case OP_ADD:
        PAIRS(+);
    case OP_SUB:
        PAIRS(-);
    case OP_MUL:
        PAIRS(*);
    default:
        PAIRS(/); /* OP_DIV */
    }
}

static void run_gemm(float *restrict dst, const float *restrict a, const float *restrict weights,
                     const float *restrict bias, int bias_step, int in_width, int w)
{
    if (bias == NULL) {
        memset(dst, 0, sizeof(float) * (size_t)w);
    } else {
        for (int j = 0; j < w; j++) {
            dst[j] = bias[j * bias_step];
        }
    }
    for (int k = 0; k < in_width; k++) {
        const float x = a[k];
        const float *restrict w_row = weights + (Py_ssize_t)k * w;
        for (int j = 0; j < w; j++) {
            dst[j] += x * w_row[j];
        }
    }
}

static inline int step_of(const Program *p, int operand)
{
    return (operand < 0 && p->constants[-1 - operand].length == 1) ? 0 : 1;
}

static void run_step(const Program *p, const Step *s, float *row)
{
    float *dst = row + p->register_offset[s->dst];
    const float *a = operand(p, row, s->a);
    if (s->code == OP_GEMM) {
        const float *bias = s->bias == 0 ? NULL : operand(p, row, s->bias);
        const int bias_step = s->bias == 0 ? 1 : step_of(p, s->bias);
        run_gemm(dst, a, operand(p, row, s->b), bias, bias_step, s->in_width, s->width);
    } else if (s->code < OP_ADD) {
        run_unary(s->code, dst, a, s->width);
    } else {
        run_binary(s->code, dst, a, step_of(p, s->a), operand(p, row, s->b), step_of(p, s->b),
                   s->width);
    }
}

static void run_rows(const Program *p, const float *inputs, float *scores, Py_ssize_t n,
                     float *row)
{
    float *out = row + p->register_offset[p->output];
    for (Py_ssize_t r = 0; r < n; r++) {
        memcpy(row, inputs + r * p->n_inputs, sizeof(float) * (size_t)p->n_inputs);
        for (Py_ssize_t i = 0; i < p->n_steps; i++) {
            run_step(p, &p->steps[i], row);
        }
        scores[r] = out[0];
    }
}

/* False, with TypeError set, for a Program made by __new__ without __init__. */
static int initialised(const Program *self)
{
    if (self->register_offset == NULL) {
        PyErr_SetString(PyExc_TypeError, "Program is not initialised");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(program_run_doc,
             "run(batch, scores, /)\n--\n\n"
             "Score each row of ``batch`` (float32, C-contiguous, shape (n, n_inputs)) "
             "into ``scores`` (a writable float32 buffer of n values).");

static PyObject *program_run(Program *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "run(batch, scores) takes two arguments");
        return NULL;
    }
    if (!initialised(self)) {
        return NULL;
    }
    Py_buffer in, out;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) <
        0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    PyObject *result = NULL;
    float *row = NULL;
    const int in_f32 = in.format != NULL && strcmp(in.format, "f") == 0;
    const int out_f32 = out.format != NULL && strcmp(out.format, "f") == 0;
    if (!in_f32 || in.ndim != 2 || in.shape[1] != self->n_inputs) {
        PyErr_Format(PyExc_ValueError, "batch: expected float32 of shape (n, %zd)",
                     self->n_inputs);
        goto done;
    }
    const Py_ssize_t n = in.shape[0];
    if (!out_f32 || out.len != n * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "scores: expected %zd float32 values", n);
        goto done;
    }
    row = PyMem_Malloc(sizeof(float) * (size_t)self->scratch_floats);
    if (row == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (n >= RELEASE_GIL_ROWS) {
        Py_BEGIN_ALLOW_THREADS run_rows(self, in.buf, out.buf, n, row);
        Py_END_ALLOW_THREADS
    } else {
        run_rows(self, in.buf, out.buf, n, row);
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(row);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* Registers of one row on the stack up to this many floats (16 KiB); a larger network
 * allocates them. */
#define STACK_ROW_FLOATS 4096

PyDoc_STRVAR(program_score_row_doc,
             "score_row(values, /)\n--\n\n"
             "The score of one row given as a sequence of n_inputs Python numbers, each "
             "rounded to float32 as numpy's cast rounds it: what run() gives for that "
             "row, without a numpy array on either side.");

static PyObject *program_score_row(Program *self, PyObject *values)
{
    if (!initialised(self)) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(values, "score_row: expected a sequence of numbers");
    if (fast == NULL) {
        return NULL;
    }
    PyObject *result = NULL;
    float stack_row[STACK_ROW_FLOATS];
    float *row = stack_row;
    if (PySequence_Fast_GET_SIZE(fast) != self->n_inputs) {
        PyErr_Format(PyExc_ValueError, "score_row: expected %zd values, got %zd",
                     self->n_inputs, PySequence_Fast_GET_SIZE(fast));
        goto done;
    }
    if (self->scratch_floats > STACK_ROW_FLOATS) {
        row = PyMem_Malloc(sizeof(float) * (size_t)self->scratch_floats);
        if (row == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < self->n_inputs; i++) {
        const double value = PyFloat_AsDouble(items[i]);
        if (value == -1.0 && PyErr_Occurred()) {
            goto done;
        }
        row[i] = (float)value; /* round to nearest, as numpy's float64 -> float32 */
    }
    for (Py_ssize_t i = 0; i < self->n_steps; i++) {
        run_step(self, &self->steps[i], row);
    }
    result = PyFloat_FromDouble(row[self->register_offset[self->output]]);
done:
    if (row != stack_row) {
        PyMem_Free(row);
    }
    Py_DECREF(fast);
    return result;
}

static PyMethodDef program_methods[] = {
    {"run", (PyCFunction)(void (*)(void))program_run, METH_FASTCALL, program_run_doc},
    {"score_row", (PyCFunction)program_score_row, METH_O, program_score_row_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProgramType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "streamscore.kernels._dense.Program",
    .tp_doc = PyDoc_STR("Program(steps, constants, values, widths, output): a dense "
                        "network as steps over per-row registers (see kernels/dense.py)."),
    .tp_basicsize = sizeof(Program),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)program_init,
    .tp_dealloc = (destructor)program_dealloc,
    .tp_methods = program_methods,
};

static int module_exec(PyObject *module)
{
    if (PyType_Ready(&ProgramType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "Program", (PyObject *)&ProgramType);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "streamscore.kernels._dense",
    .m_doc = "A small dense network evaluated in C (see kernels/dense.py).",
    .m_size = 0,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__dense(void)
{
    return PyModuleDef_Init(&module);
}
