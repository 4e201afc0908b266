/*
 * The three loops of a full IMA appraisal that Python spends its time in per entry:
 * walking binary_runtime_measurements (framing, fields, template hash), extending
 * PCR 10 per bank, and looking each entry's (digest, path) up in the policy.
 * See verifier/ima/_native.pyi for the contract; docs/ima.md "Performance" for why.
 *
 * walk_entries() accepts only entries that parse.py's plain reader accepts (a
 * template of the table it is given, every field in the shape the reader checks,
 * the template hash equal to the hash of the template data, or all zeros) and
 * STOPS at the first entry it does not accept, returning where: parse.py then
 * reads that entry with the plain reader, which either names what is wrong with
 * it (entry index, field, byte offset) or returns it (a template this walk does
 * not know), and the walk goes on after it. It never raises for any content of a
 * list, only for wrong arguments (a caller's bug).
 *
 * Every read is preceded by a check that it lies within the buffer; positions are
 * Py_ssize_t and the buffer is at most UINT32_MAX bytes (the spans are u32).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define MAX_TEMPLATES 32
#define MAX_FIELDS 16
#define MAX_PREFIXES 64
#define MAX_BANKS 8
#define MAX_HASH 64
#define PCR_COUNT 24
#define SPAN_WORDS 6 /* offset, data start, data length, key length, pcr, info */
#define INFO_TEMPLATE 0xFFu
#define INFO_VIOLATION 0x100u
#define INFO_SIGNED 0x200u /* a non-empty sig field */
#define INFO_SIDE 0x400u   /* template data in the side buffer (set by parse.py) */

static uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void
put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

typedef struct {
    const unsigned char *name;
    Py_ssize_t name_len;
    const char *codes; /* one per field: D d-ng, N n-ng, M d-modsig, U uint, S sig, O opaque */
    Py_ssize_t fields;
} template_t;

typedef struct {
    const unsigned char *text;
    Py_ssize_t len;
    Py_ssize_t size;
} prefix_t;

/* The first ":\0" in p[0..n), or -1. */
static Py_ssize_t
find_colon_nul(const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i + 1 < n; i++)
        if (p[i] == ':' && p[i + 1] == 0)
            return i;
    return -1;
}

/* A "<algo>:\0<digest>" field with a known prefix of the right size (what
   _digest_field accepts without its slower branches). */
static int
known_digest(const unsigned char *p, Py_ssize_t n, const prefix_t *prefixes, Py_ssize_t count,
             Py_ssize_t max_cut)
{
    Py_ssize_t cut = find_colon_nul(p, n);
    if (cut <= 0 || cut >= max_cut)
        return 0;
    for (Py_ssize_t k = 0; k < count; k++)
        if (prefixes[k].len == cut && memcmp(prefixes[k].text, p, (size_t)cut) == 0)
            return n == cut + 2 + prefixes[k].size;
    return 0;
}

static int
hash_bytes(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *p, size_t n,
           unsigned char *out)
{
    unsigned int written = 0;
    return EVP_DigestInit_ex2(ctx, md, NULL) && EVP_DigestUpdate(ctx, p, n)
           && EVP_DigestFinal_ex(ctx, out, &written);
}

static PyObject *
walk_entries(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t pos, count, max_entries, hsize, max_data;
    const char *md_name;
    PyObject *templates_obj, *prefixes_obj;
    if (!PyArg_ParseTuple(args, "y*nnnnsnO!O!:walk_entries", &buf, &pos, &count, &max_entries,
                          &hsize, &md_name, &max_data, &PyTuple_Type, &templates_obj,
                          &PyTuple_Type, &prefixes_obj))
        return NULL;
    const unsigned char *data = buf.buf;
    const Py_ssize_t end = buf.len;
    template_t templates[MAX_TEMPLATES];
    prefix_t prefixes[MAX_PREFIXES];
    const Py_ssize_t ntemplates = PyTuple_GET_SIZE(templates_obj);
    const Py_ssize_t nprefixes = PyTuple_GET_SIZE(prefixes_obj);
    EVP_MD *md = NULL;
    EVP_MD_CTX *ctx = NULL;
    unsigned char *spans = NULL;
    Py_ssize_t taken = 0, cap = 0;
    PyObject *out = NULL;

    if (ntemplates > MAX_TEMPLATES || nprefixes > MAX_PREFIXES || hsize < 1 || hsize > MAX_HASH
        || pos < 0 || pos > end || count < 0 || max_entries < 0 || max_data < 0
        || end > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "walk_entries: argument out of range");
        goto done;
    }
    for (Py_ssize_t t = 0; t < ntemplates; t++) {
        PyObject *item = PyTuple_GET_ITEM(templates_obj, t);
        PyObject *name, *codes;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyBytes_Check(name = PyTuple_GET_ITEM(item, 0))
            || !PyBytes_Check(codes = PyTuple_GET_ITEM(item, 1)) || PyBytes_GET_SIZE(codes) < 2
            || PyBytes_GET_SIZE(codes) > MAX_FIELDS || PyBytes_AS_STRING(codes)[0] != 'D'
            || PyBytes_AS_STRING(codes)[1] != 'N') {
            PyErr_SetString(PyExc_ValueError, "walk_entries: templates are (name, b'DN...')");
            goto done;
        }
        templates[t] = (template_t){(const unsigned char *)PyBytes_AS_STRING(name),
                                    PyBytes_GET_SIZE(name), PyBytes_AS_STRING(codes),
                                    PyBytes_GET_SIZE(codes)};
    }
    for (Py_ssize_t k = 0; k < nprefixes; k++) {
        PyObject *item = PyTuple_GET_ITEM(prefixes_obj, k);
        PyObject *text, *size;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyBytes_Check(text = PyTuple_GET_ITEM(item, 0))
            || !PyLong_Check(size = PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_ValueError, "walk_entries: prefixes are (bytes, int)");
            goto done;
        }
        prefixes[k] = (prefix_t){(const unsigned char *)PyBytes_AS_STRING(text),
                                 PyBytes_GET_SIZE(text), PyLong_AsSsize_t(size)};
        if (prefixes[k].size < 1 || prefixes[k].size > MAX_HASH) {
            PyErr_SetString(PyExc_ValueError, "walk_entries: digest size out of range");
            goto done;
        }
    }
    md = EVP_MD_fetch(NULL, md_name, NULL);
    ctx = EVP_MD_CTX_new();
    if (md == NULL || ctx == NULL || EVP_MD_get_size(md) != hsize) {
        PyErr_Format(PyExc_LookupError, "walk_entries: no %zd-byte OpenSSL digest %s", hsize,
                     md_name);
        goto done;
    }

    const Py_ssize_t head = 8 + hsize;
    static const unsigned char zero[MAX_HASH];
    while (pos < end && count < max_entries) {
        const unsigned char *p = data + pos;
        if (end - pos < head)
            break;
        uint32_t pcr = le32(p);
        uint32_t name_len = le32(p + 4 + hsize);
        if (pcr >= PCR_COUNT || name_len < 1 || name_len > 255
            || (Py_ssize_t)name_len + 4 > end - pos - head)
            break;
        const unsigned char *name = p + head;
        Py_ssize_t t = 0;
        for (; t < ntemplates; t++)
            if (templates[t].name_len == (Py_ssize_t)name_len
                && memcmp(templates[t].name, name, name_len) == 0)
                break;
        if (t == ntemplates)
            break; /* the legacy "ima" template, a custom one, or not a name */
        const Py_ssize_t dlen_at = pos + head + (Py_ssize_t)name_len;
        const uint32_t dlen = le32(data + dlen_at);
        const Py_ssize_t tstart = dlen_at + 4;
        if ((Py_ssize_t)dlen > max_data || (Py_ssize_t)dlen > end - tstart)
            break;
        /* the fields, as _split_fields and _entry read them */
        const unsigned char *td = data + tstart;
        Py_ssize_t at = 0, key_len = 0;
        int ok = 1, signed_ = 0;
        for (Py_ssize_t f = 0; ok && f < templates[t].fields; f++) {
            if ((Py_ssize_t)dlen - at < 4) {
                ok = 0;
                break;
            }
            const Py_ssize_t flen = le32(td + at);
            if (flen > (Py_ssize_t)dlen - at - 4) {
                ok = 0;
                break;
            }
            const unsigned char *v = td + at + 4;
            switch (templates[t].codes[f]) {
            case 'D':
                ok = known_digest(v, flen, prefixes, nprefixes, PY_SSIZE_T_MAX);
                break;
            case 'N': /* one NUL-terminated string */
                ok = flen >= 1 && memchr(v, 0, (size_t)flen) == v + flen - 1;
                break;
            case 'M':
                ok = flen == 0 || known_digest(v, flen, prefixes, nprefixes, 40);
                break;
            case 'U':
                ok = flen == 0 || flen == 2 || flen == 4 || flen == 8;
                break;
            case 'S':
                signed_ = flen > 0;
                break;
            default:
                break;
            }
            at += 4 + flen;
            if (f == 1)
                key_len = at;
        }
        if (!ok || at != (Py_ssize_t)dlen)
            break;
        const unsigned char *th = p + 4;
        const int violation = memcmp(th, zero, (size_t)hsize) == 0;
        if (!violation) {
            unsigned char actual[EVP_MAX_MD_SIZE];
            if (!hash_bytes(ctx, md, td, dlen, actual)) {
                PyErr_SetString(PyExc_RuntimeError, "walk_entries: OpenSSL digest failed");
                goto done;
            }
            if (memcmp(actual, th, (size_t)hsize) != 0)
                break; /* forged: parse.py names it */
        }
        if (taken == cap) {
            cap = cap ? cap * 2 : 1024;
            unsigned char *grown = PyMem_Realloc(spans, (size_t)cap * SPAN_WORDS * 4);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            spans = grown;
        }
        unsigned char *s = spans + taken * SPAN_WORDS * 4;
        put32(s, (uint32_t)pos);
        put32(s + 4, (uint32_t)tstart);
        put32(s + 8, dlen);
        put32(s + 12, (uint32_t)key_len);
        put32(s + 16, pcr);
        put32(s + 20, (uint32_t)t | (violation ? INFO_VIOLATION : 0) | (signed_ ? INFO_SIGNED : 0));
        taken++;
        count++;
        pos = tstart + dlen;
    }
    PyObject *packed = PyBytes_FromStringAndSize((const char *)spans, taken * SPAN_WORDS * 4);
    if (packed != NULL)
        out = Py_BuildValue("(nN)", pos, packed);
done:
    PyMem_Free(spans);
    EVP_MD_CTX_free(ctx);
    EVP_MD_free(md);
    PyBuffer_Release(&buf);
    return out;
}

/* Span i of a bytes object of packed u32 records; 0 when the range is wrong. */
static int
span_range(Py_buffer *spans, Py_ssize_t lo, Py_ssize_t hi)
{
    const Py_ssize_t n = spans->len / (SPAN_WORDS * 4);
    return spans->len % (SPAN_WORDS * 4) == 0 && 0 <= lo && lo <= hi && hi <= n;
}

static PyObject *
extend_entries(PyObject *self, PyObject *args)
{
    Py_buffer data, side, spans;
    Py_ssize_t lo, hi, hsize;
    int padded;
    PyObject *names, *reuse, *start, *targets;
    if (!PyArg_ParseTuple(args, "y*y*y*nnnpO!O!O!O!:extend_entries", &data, &side, &spans, &lo,
                          &hi, &hsize, &padded, &PyTuple_Type, &names, &PyTuple_Type, &reuse,
                          &PyTuple_Type, &start, &PyTuple_Type, &targets))
        return NULL;
    const Py_ssize_t banks = PyTuple_GET_SIZE(names);
    EVP_MD *md[MAX_BANKS] = {NULL};
    EVP_MD *sha1 = NULL;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char pcr[MAX_BANKS][EVP_MAX_MD_SIZE];
    unsigned char target[MAX_BANKS][EVP_MAX_MD_SIZE];
    int size[MAX_BANKS], use_th[MAX_BANKS];
    PyObject *out = NULL;
    Py_ssize_t proven = -1;

    if (!span_range(&spans, lo, hi) || banks < 1 || banks > MAX_BANKS
        || PyTuple_GET_SIZE(reuse) != banks || PyTuple_GET_SIZE(start) != banks
        || PyTuple_GET_SIZE(targets) != banks || hsize < 1 || hsize > MAX_HASH || ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "extend_entries: argument out of range");
        goto done;
    }
    sha1 = EVP_MD_fetch(NULL, "SHA1", NULL);
    for (Py_ssize_t k = 0; k < banks; k++) {
        PyObject *name = PyTuple_GET_ITEM(names, k);
        PyObject *s0 = PyTuple_GET_ITEM(start, k), *t0 = PyTuple_GET_ITEM(targets, k);
        if (!PyUnicode_Check(name) || !PyBytes_Check(s0) || !PyBytes_Check(t0)) {
            PyErr_SetString(PyExc_ValueError, "extend_entries: names are str, values bytes");
            goto done;
        }
        md[k] = EVP_MD_fetch(NULL, PyUnicode_AsUTF8(name), NULL);
        if (md[k] == NULL || sha1 == NULL) {
            PyErr_Format(PyExc_LookupError, "extend_entries: OpenSSL has no digest %U", name);
            goto done;
        }
        size[k] = EVP_MD_get_size(md[k]);
        use_th[k] = PyObject_IsTrue(PyTuple_GET_ITEM(reuse, k)) == 1;
        if (size[k] < 20 || size[k] > MAX_HASH || PyBytes_GET_SIZE(s0) != size[k]
            || PyBytes_GET_SIZE(t0) != size[k] || (use_th[k] && hsize != (padded ? 20 : size[k]))) {
            PyErr_SetString(PyExc_ValueError, "extend_entries: value sizes");
            goto done;
        }
        memcpy(pcr[k], PyBytes_AS_STRING(s0), (size_t)size[k]);
        memcpy(target[k], PyBytes_AS_STRING(t0), (size_t)size[k]);
    }
    const unsigned char *d = data.buf, *sd = side.buf, *sp = spans.buf;
    for (Py_ssize_t i = lo; i < hi && proven < 0; i++) {
        const unsigned char *s = sp + i * SPAN_WORDS * 4;
        const Py_ssize_t offset = le32(s), tstart = le32(s + 4), tlen = le32(s + 8);
        const uint32_t info = le32(s + 20);
        const unsigned char *base = info & INFO_SIDE ? sd : d;
        const Py_ssize_t limit = info & INFO_SIDE ? side.len : data.len;
        if (tstart > limit || tlen > limit - tstart || offset + 4 + hsize > data.len) {
            PyErr_Format(PyExc_ValueError, "extend_entries: span %zd out of its buffer", i);
            goto done;
        }
        int all = 1;
        for (Py_ssize_t k = 0; k < banks; k++) {
            unsigned char value[EVP_MAX_MD_SIZE];
            const int vsize = padded ? 20 : size[k];
            memset(value, 0, sizeof value);
            if (info & INFO_VIOLATION)
                memset(value, 0xFF, (size_t)vsize);
            else if (use_th[k])
                memcpy(value, d + offset + 4, (size_t)vsize);
            else if (!hash_bytes(ctx, padded ? sha1 : md[k], base + tstart, (size_t)tlen, value))
                goto openssl;
            unsigned int written = 0;
            if (!EVP_DigestInit_ex2(ctx, md[k], NULL)
                || !EVP_DigestUpdate(ctx, pcr[k], (size_t)size[k])
                || !EVP_DigestUpdate(ctx, value, (size_t)size[k])
                || !EVP_DigestFinal_ex(ctx, pcr[k], &written))
                goto openssl;
            /* PCR values are public: memcmp is enough */
            all = all && memcmp(pcr[k], target[k], (size_t)size[k]) == 0;
        }
        if (all)
            proven = i + 1 - lo;
    }
    PyObject *values = PyTuple_New(banks);
    for (Py_ssize_t k = 0; values != NULL && k < banks; k++) {
        PyObject *v = PyBytes_FromStringAndSize((const char *)pcr[k], size[k]);
        if (v == NULL)
            Py_CLEAR(values);
        else
            PyTuple_SET_ITEM(values, k, v);
    }
    if (values != NULL)
        out = Py_BuildValue("(nN)", proven, values);
    goto done;
openssl:
    PyErr_SetString(PyExc_RuntimeError, "extend_entries: OpenSSL digest failed");
done:
    for (Py_ssize_t k = 0; k < MAX_BANKS; k++)
        EVP_MD_free(md[k]);
    EVP_MD_free(sha1);
    EVP_MD_CTX_free(ctx);
    PyBuffer_Release(&data);
    PyBuffer_Release(&side);
    PyBuffer_Release(&spans);
    return out;
}

static PyObject *
unmatched_entries(PyObject *self, PyObject *args)
{
    Py_buffer data, spans;
    Py_ssize_t lo, hi, pcr_wanted;
    PyObject *eligible, *keys;
    if (!PyArg_ParseTuple(args, "y*y*nnnSO:unmatched_entries", &data, &spans, &lo, &hi,
                          &pcr_wanted, &eligible, &keys))
        return NULL;
    PyObject *out = NULL;
    if (!span_range(&spans, lo, hi) || !PyAnySet_Check(keys)) {
        PyErr_SetString(PyExc_ValueError, "unmatched_entries: span range or key set");
        goto done;
    }
    out = PyList_New(0);
    const unsigned char *d = data.buf, *sp = spans.buf;
    const unsigned char *flags = (const unsigned char *)PyBytes_AS_STRING(eligible);
    const Py_ssize_t nflags = PyBytes_GET_SIZE(eligible);
    for (Py_ssize_t i = lo; out != NULL && i < hi; i++) {
        const unsigned char *s = sp + i * SPAN_WORDS * 4;
        const Py_ssize_t tstart = le32(s + 4), key_len = le32(s + 12), pcr = le32(s + 16);
        const uint32_t info = le32(s + 20);
        const Py_ssize_t t = info & INFO_TEMPLATE;
        /* eligible[t]: 0 never, 1 when the key is listed, 2 also only without a signature */
        int fast = !(info & (INFO_VIOLATION | INFO_SIDE)) && pcr == pcr_wanted && t < nflags
                   && flags[t] != 0 && !(flags[t] == 2 && (info & INFO_SIGNED)) && key_len > 0
                   && tstart <= data.len && key_len <= data.len - tstart;
        if (fast) {
            PyObject *key = PyBytes_FromStringAndSize((const char *)d + tstart, key_len);
            int found = key == NULL ? -1 : PySet_Contains(keys, key);
            Py_XDECREF(key);
            if (found < 0) {
                Py_CLEAR(out);
                break;
            }
            fast = found;
        }
        if (!fast) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(out, index) < 0)
                Py_CLEAR(out);
            Py_XDECREF(index);
        }
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&spans);
    return out;
}

static PyMethodDef methods[] = {
    {"walk_entries", walk_entries, METH_VARARGS,
     "Walk the binary entries the plain reader would accept; (stop offset, packed spans)."},
    {"extend_entries", extend_entries, METH_VARARGS,
     "Extend PCR 10 per bank over spans lo..hi until every bank is its target."},
    {"unmatched_entries", unmatched_entries, METH_VARARGS,
     "The span indices in lo..hi whose (digest, path) key is not in the set (or not eligible)."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *m)
{
    return PyModule_AddIntConstant(m, "SPAN_WORDS", SPAN_WORDS) < 0
                   || PyModule_AddIntConstant(m, "INFO_VIOLATION", INFO_VIOLATION) < 0
                   || PyModule_AddIntConstant(m, "INFO_SIDE", INFO_SIDE) < 0
                   || PyModule_AddIntConstant(m, "MAX_TEMPLATES", MAX_TEMPLATES) < 0
                   || PyModule_AddIntConstant(m, "MAX_BANKS", MAX_BANKS) < 0
               ? -1
               : 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "verifier.ima._native",
    .m_doc = "IMA list walk, PCR 10 replay and policy lookup in C (see _native.pyi).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&module);
}
