/* The served LaFAM map as a PNG in one call (handlers._png, built when the package is installed; optional).
 *
 * Right after a forward pass has streamed a model's weights through the caches, every Python-level
 * operation costs several times its warm time, and writing a PNG takes dozens of them. This module does the
 * served default's whole per-map work in one C call from the runtime's channel mean: the reference LaFAM
 * scaling (handlers.explain.lafam: non-finite values clamped, min-max in float64, a constant map all zeros),
 * the 8-bit grey levels (handlers.encode.to_pixels' rounding), the nearest upsampling, the PNG and its base64.
 *
 * The upsampled image is never built. Nearest upsampling repeats each source pixel over a run of output
 * columns and each source row over a run of output rows, so the image data is written as one fixed-Huffman
 * deflate block of literals and back-references: the first output row of each source row (PNG filter None)
 * as one literal and a distance-1 copy per column run; each repeat (filter Up: a 2 then zeros) copied from
 * the row above. Adler-32 is summed run by run. The work is O(h * w + H), not O(H * W), and a 7x7 map at
 * 224x224 is a PNG of a few hundred bytes. The Python fallback (handlers.encode) gives the same pixels;
 * tests/unit/test_encode.py holds both to the reference through Pillow's decoder.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_of(const uint8_t *data, size_t length) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < length; i++) c = crc_table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* Deflate's bit writer: bits go out least significant first; Huffman codes are written most significant first. */
typedef struct {
    uint8_t *out;
    size_t pos, cap;
    uint64_t bits;
    int count;
    int overflow;
} Bits;

static void put_bits(Bits *b, uint32_t value, int n) {
    b->bits |= (uint64_t)value << b->count;
    b->count += n;
    while (b->count >= 8) {
        if (b->pos < b->cap) b->out[b->pos++] = (uint8_t)b->bits;
        else b->overflow = 1;
        b->bits >>= 8;
        b->count -= 8;
    }
}

static uint32_t reverse(uint32_t code, int length) {
    uint32_t reversed = 0;
    for (int i = 0; i < length; i++) reversed |= ((code >> i) & 1u) << (length - 1 - i);
    return reversed;
}

/* The fixed literal/length code (RFC 1951, 3.2.6) and the 5-bit distance codes, bit-reversed once at import. */
static uint16_t symbol_code[288], distance_code[30];
static uint8_t symbol_length[288];

static void codes_init(void) {
    for (int s = 0; s < 288; s++) {
        uint32_t code;
        int length;
        if (s < 144) code = 0x30 + s, length = 8;
        else if (s < 256) code = 0x190 + s - 144, length = 9;
        else if (s < 280) code = s - 256, length = 7;
        else code = 0xC0 + s - 280, length = 8;
        symbol_code[s] = (uint16_t)reverse(code, length);
        symbol_length[s] = (uint8_t)length;
    }
    for (int d = 0; d < 30; d++) distance_code[d] = (uint16_t)reverse((uint32_t)d, 5);
}

static void put_symbol(Bits *b, int symbol) { put_bits(b, symbol_code[symbol], symbol_length[symbol]); }

static const uint16_t LENGTH_BASE[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                         31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LENGTH_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                         2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DISTANCE_BASE[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,
                                           33,  49,  65,  97,  129, 193,  257,  385,  513,  769,
                                           1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const uint8_t DISTANCE_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3,  3,  4,  4,  5,  5,  6,
                                           6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

static void put_match(Bits *b, int length, int distance) { /* 3 <= length <= 258, 1 <= distance <= 32768 */
    int i = 28;
    while (LENGTH_BASE[i] > length) i--;
    put_symbol(b, 257 + i);
    put_bits(b, (uint32_t)(length - LENGTH_BASE[i]), LENGTH_EXTRA[i]);
    int d = 29;
    while (DISTANCE_BASE[d] > distance) d--;
    put_bits(b, distance_code[d], 5);
    put_bits(b, (uint32_t)(distance - DISTANCE_BASE[d]), DISTANCE_EXTRA[d]);
}

/* Copy `total` (>= 3) bytes from `distance` back, in matches of 3..258 bytes. */
static void put_copy(Bits *b, size_t total, int distance) {
    while (total > 0) {
        size_t length = total > 258 ? 258 : total;
        if (total - length > 0 && total - length < 3) length = total - 3;
        put_match(b, (int)length, distance);
        total -= length;
    }
}

/* `n` bytes of value `v`: one literal, then copies of the byte before. */
static void put_run(Bits *b, uint8_t v, size_t n) {
    put_symbol(b, v);
    if (n - 1 >= 3) put_copy(b, n - 1, 1);
    else
        for (size_t i = 1; i < n; i++) put_symbol(b, v);
}

typedef struct {
    uint64_t s1, s2;
} Adler;

static void adler_run(Adler *a, uint64_t v, uint64_t n) { /* n bytes of value v */
    a->s2 = (a->s2 + n * a->s1 + v * (n * (n + 1) / 2 % 65521)) % 65521;
    a->s1 = (a->s1 + n * v) % 65521;
}

/* k rows of a 2 then `width` zeros (filter Up, no change): after row j, s1 = s1 + 2j and s2 grows by
 * (width + 1) * s1; summed over j = 1..k in closed form (a loop would cost a 64-bit division per row). */
static void adler_repeats(Adler *a, uint64_t k, uint64_t width) {
    uint64_t rows = k % 65521, line = (width + 1) % 65521;
    uint64_t sum = (rows * a->s1 + (k * (k + 1)) % 65521) % 65521; /* sum over j of (s1 + 2j) */
    a->s2 = (a->s2 + line * sum) % 65521;
    a->s1 = (a->s1 + 2 * rows) % 65521;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static const uint8_t SIGNATURE[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

/* Write the PNG of `grey` (h x w, row-major) nearest-upsampled by the run lengths `rows` (h) and `columns` (w).
 * Returns a malloc'd buffer and its length, or NULL with a Python exception set. */
static uint8_t *write_png(const uint8_t *grey, Py_ssize_t h, Py_ssize_t w, const int32_t *rows, const int32_t *columns,
                          size_t *length_out) {
    uint64_t height = 0, width = 0;
    for (Py_ssize_t i = 0; i < h; i++) height += (uint64_t)rows[i];
    for (Py_ssize_t i = 0; i < w; i++) width += (uint64_t)columns[i];
    if (height == 0 || width == 0 || height > 0x7FFFFFFF || width > 0x7FFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "the upsampled size must be at least 1x1 and fit a PNG");
        return NULL;
    }
    /* bound: a key row costs at most 57 bits per column run and 0.12 bits per byte, a repeat row 78 bits and
     * 0.12 bits per byte (see put_run / put_copy), each row 3 more; with room to spare */
    size_t cap = (size_t)h * ((size_t)w * 8 + width / 8 + 16) + (size_t)height * (width / 64 + 16) + 64;
    size_t total = 8 + 25 + 12 + 2 + cap + 4 + 12;
    uint8_t *png = malloc(total);
    if (png == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    uint8_t *p = png;
    memcpy(p, SIGNATURE, 8);
    p += 8;
    put_be32(p, 13);
    memcpy(p + 4, "IHDR", 4);
    put_be32(p + 8, (uint32_t)width);
    put_be32(p + 12, (uint32_t)height);
    p[16] = 8; /* bit depth */
    p[17] = 0; /* greyscale */
    p[18] = p[19] = p[20] = 0; /* deflate, adaptive filtering, no interlace */
    put_be32(p + 21, crc32_of(p + 4, 17));
    p += 25;
    uint8_t *idat = p; /* length, then "IDAT", then the zlib stream */
    memcpy(idat + 4, "IDAT", 4);
    uint8_t *z = idat + 8;
    z[0] = 0x78; /* deflate, 32 KiB window */
    z[1] = 0x01;
    Bits b = {z + 2, 0, cap, 0, 0, 0};
    put_bits(&b, 1, 1); /* final block */
    put_bits(&b, 1, 2); /* fixed Huffman codes */
    Adler a = {1, 0};
    uint64_t line = width + 1;
    for (Py_ssize_t r = 0; r < h; r++) {
        uint64_t count = (uint64_t)rows[r];
        if (count == 0) continue; /* a source row no output row picks (downsampling) */
        const uint8_t *source = grey + r * w;
        put_symbol(&b, 0); /* filter None */
        adler_run(&a, 0, 1);
        for (Py_ssize_t c = 0; c < w; c++) {
            if (columns[c] == 0) continue;
            put_run(&b, source[c], (size_t)columns[c]);
            adler_run(&a, source[c], (uint64_t)columns[c]);
        }
        if (count >= 2) { /* the first repeat: filter Up, all zeros */
            put_symbol(&b, 2);
            put_run(&b, 0, (size_t)width);
        }
        if (count >= 3) { /* the later repeats: copies of the first */
            uint64_t rest = (count - 2) * line;
            if (line <= 32768 && rest >= 3) {
                put_copy(&b, (size_t)rest, (int)line);
            } else {
                for (uint64_t i = 2; i < count; i++) {
                    put_symbol(&b, 2);
                    put_run(&b, 0, (size_t)width);
                }
            }
        }
        if (count >= 2) adler_repeats(&a, count - 1, width);
    }
    put_symbol(&b, 256); /* end of block */
    if (b.count > 0) put_bits(&b, 0, 8 - b.count);
    if (b.overflow) {
        free(png);
        PyErr_SetString(PyExc_RuntimeError, "PNG writer: output bound exceeded");
        return NULL;
    }
    size_t zlength = 2 + b.pos;
    put_be32(z + zlength, (uint32_t)((a.s2 << 16) | a.s1));
    zlength += 4;
    put_be32(idat, (uint32_t)zlength);
    put_be32(idat + 8 + zlength, crc32_of(idat + 4, zlength + 4));
    p = idat + 12 + zlength;
    put_be32(p, 0);
    memcpy(p + 4, "IEND", 4);
    put_be32(p + 8, crc32_of(p + 4, 4));
    p += 12;
    *length_out = (size_t)(p - png);
    return png;
}

/* The grey levels of `count` channel-mean values, as handlers.explain.lafam.lafam then to_pixels compute them;
 * returns whether they are all 0. */
static int grey_levels(const float *mean, Py_ssize_t count, uint8_t *grey) {
    double low = INFINITY, high = -INFINITY;
    for (Py_ssize_t i = 0; i < count; i++) {
        double v = mean[i];
        if (isnan(v)) v = 0.0;
        else if (v > FLT_MAX) v = FLT_MAX;
        else if (v < -FLT_MAX) v = -FLT_MAX;
        if (v < low) low = v;
        if (v > high) high = v;
    }
    double span = high - low;
    int empty = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        double v = mean[i];
        if (isnan(v)) v = 0.0;
        else if (v > FLT_MAX) v = FLT_MAX;
        else if (v < -FLT_MAX) v = -FLT_MAX;
        float scaled = span > 0 ? (float)((v - low) / (span > DBL_MIN ? span : DBL_MIN)) : 0.0f;
        if (scaled < 0.0f) scaled = 0.0f;
        if (scaled > 1.0f) scaled = 1.0f;
        float level = scaled * 255.0f;
        level = level + 0.5f;
        grey[i] = (uint8_t)level;
        empty &= grey[i] == 0;
    }
    return empty;
}

/* Parse (data, offset, rows, columns): the map's h x w items start at item `offset` of `data`, which holds
 * float32 values (`floats`) or bytes. On failure, a Python exception is set and no buffer is held. */
static int parse(PyObject *args, Py_buffer *data, Py_ssize_t *offset, Py_buffer *rows, Py_buffer *columns,
                 int floats) {
    PyObject *source, *row_runs, *column_runs;
    if (!PyArg_ParseTuple(args, "OnOO", &source, offset, &row_runs, &column_runs)) return 0;
    if (PyObject_GetBuffer(source, data, PyBUF_C_CONTIGUOUS | (floats ? PyBUF_FORMAT : 0)) < 0) return 0;
    if (floats && (data->format == NULL || data->itemsize != 4 ||
                   (strcmp(data->format, "f") && strcmp(data->format, "<f") && strcmp(data->format, "=f")))) {
        PyErr_SetString(PyExc_TypeError, "png: the channel means must be float32");
        PyBuffer_Release(data);
        return 0;
    }
    if (PyObject_GetBuffer(row_runs, rows, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(data);
        return 0;
    }
    if (PyObject_GetBuffer(column_runs, columns, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(data);
        PyBuffer_Release(rows);
        return 0;
    }
    Py_ssize_t h = rows->len / 4, w = columns->len / 4, itemsize = floats ? 4 : 1;
    const char *problem = NULL;
    if (rows->len % 4 || columns->len % 4 || h == 0 || w == 0 || *offset < 0 ||
        (data->len / itemsize - *offset) / w < h)
        problem = "png: rows/columns must be int32 run lengths within the data";
    for (Py_ssize_t i = 0; problem == NULL && i < h; i++)
        if (((const int32_t *)rows->buf)[i] < 0) problem = "png: run lengths must not be negative";
    for (Py_ssize_t i = 0; problem == NULL && i < w; i++)
        if (((const int32_t *)columns->buf)[i] < 0) problem = "png: run lengths must not be negative";
    if (problem != NULL) {
        PyErr_SetString(PyExc_ValueError, problem);
        PyBuffer_Release(data);
        PyBuffer_Release(rows);
        PyBuffer_Release(columns);
        return 0;
    }
    return 1;
}

static PyObject *png_from_grey(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data, rows, columns;
    Py_ssize_t offset;
    if (!parse(args, &data, &offset, &rows, &columns, 0)) return NULL;
    size_t length = 0;
    uint8_t *png = write_png((const uint8_t *)data.buf + offset, rows.len / 4, columns.len / 4,
                             (const int32_t *)rows.buf, (const int32_t *)columns.buf, &length);
    PyBuffer_Release(&data);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&columns);
    if (png == NULL) return NULL;
    PyObject *result = PyBytes_FromStringAndSize((const char *)png, (Py_ssize_t)length);
    free(png);
    return result;
}

static const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static PyObject *lafam_png_base64(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data, rows, columns;
    Py_ssize_t offset;
    if (!parse(args, &data, &offset, &rows, &columns, 1)) return NULL;
    Py_ssize_t h = rows.len / 4, w = columns.len / 4;
    uint8_t *grey = malloc((size_t)(h * w));
    if (grey == NULL) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&rows);
        PyBuffer_Release(&columns);
        return PyErr_NoMemory();
    }
    int empty = grey_levels((const float *)data.buf + offset, h * w, grey);
    size_t length = 0;
    uint8_t *png = write_png(grey, h, w, (const int32_t *)rows.buf, (const int32_t *)columns.buf, &length);
    free(grey);
    PyBuffer_Release(&data);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&columns);
    if (png == NULL) return NULL;
    Py_ssize_t encoded = (Py_ssize_t)((length + 2) / 3 * 4);
    PyObject *text = PyUnicode_New(encoded, 127);
    if (text == NULL) {
        free(png);
        return NULL;
    }
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
    size_t i = 0;
    for (; i + 3 <= length; i += 3) {
        uint32_t v = (uint32_t)png[i] << 16 | (uint32_t)png[i + 1] << 8 | png[i + 2];
        *out++ = BASE64[v >> 18];
        *out++ = BASE64[(v >> 12) & 63];
        *out++ = BASE64[(v >> 6) & 63];
        *out++ = BASE64[v & 63];
    }
    if (i < length) {
        uint32_t v = (uint32_t)png[i] << 16 | (i + 1 < length ? (uint32_t)png[i + 1] << 8 : 0);
        *out++ = BASE64[v >> 18];
        *out++ = BASE64[(v >> 12) & 63];
        *out++ = i + 1 < length ? BASE64[(v >> 6) & 63] : '=';
        *out++ = '=';
    }
    free(png);
    PyObject *result = PyTuple_Pack(2, text, empty ? Py_True : Py_False);
    Py_DECREF(text);
    return result;
}

static PyMethodDef METHODS[] = {
    {"png_from_grey", png_from_grey, METH_VARARGS,
     "png_from_grey(grey, offset, rows, columns) -> bytes\n\n"
     "The PNG of h x w uint8 grey levels starting at byte `offset` of `grey`, nearest-upsampled: `rows` and "
     "`columns` are int32 run lengths (how many output rows / columns each source row / column gives)."},
    {"lafam_png_base64", lafam_png_base64, METH_VARARGS,
     "lafam_png_base64(mean, offset, rows, columns) -> (str, bool)\n\n"
     "The base64 PNG of the LaFAM map of h x w float32 channel-mean values starting at item `offset` of "
     "`mean` (min-max scaled as handlers.explain.lafam, grey levels as handlers.encode.to_pixels), "
     "nearest-upsampled as png_from_grey; and whether every grey level is 0."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "_png", "The served LaFAM PNG in one call.", -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__png(void) {
    crc_init();
    codes_init();
    return PyModule_Create(&MODULE);
}
