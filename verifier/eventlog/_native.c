/*
 * The two loops of an appraisal that Python spends the most time in per byte of
 * work: walking TCG_PCR_EVENT2 records into columns, and extending a PCR bank.
 * See verifier/eventlog/_native.pyi for the contract; docs/eventlog.md for why.
 *
 * walk_records() accepts exactly the records that the Python fast path accepted
 * (every bank once, in the Spec ID event's order, PCR <= max_pcr, eventSize within
 * the limit and within the log) and STOPS at the first record it does not accept,
 * returning where: parse.py then reads that record field by field and reports
 * what is wrong with it (structure, field, byte offset). It never raises for
 * any content of the log, only for wrong arguments (a caller's bug).
 *
 * Every read is preceded by a check that it lies within the buffer, computed
 * in Py_ssize_t from quantities already proven in range (no sum can overflow:
 * a record header is at most 12 + 8 * (2 + 128) + 4 bytes, an event at most
 * the buffer's length).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define MAX_BANKS 8       /* walk_records: banks per record (the module's MAX_BANKS) */
#define MAX_DIGEST 128    /* walk_records: digest size (SpecIdEvent.parse allows 1..128) */
#define PCR_COUNT 24      /* PC Client PCRs 0..23 */

static uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t
le16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

/* Append a new reference, stealing it; -1 with an exception set on failure. */
static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *
walk_records(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t offset, stop_at, max_records, max_data, marker_type;
    unsigned long max_pcr;
    PyObject *alg_ids, *sizes, *offsets, *ends, *starts, *pcrs, *types, *columns;
    PyObject *marker;
    if (!PyArg_ParseTuple(args, "y*nnO!O!nnknSO!O!O!O!O!O!:walk_records", &buf, &offset,
                          &stop_at, &PyTuple_Type, &alg_ids, &PyTuple_Type, &sizes,
                          &max_records, &max_data, &max_pcr, &marker_type, &marker,
                          &PyList_Type, &offsets, &PyList_Type, &ends, &PyList_Type, &starts,
                          &PyList_Type, &pcrs, &PyList_Type, &types, &PyList_Type, &columns))
        return NULL;

    const unsigned char *data = buf.buf;
    const Py_ssize_t end = buf.len;
    const Py_ssize_t banks = PyTuple_GET_SIZE(alg_ids);
    uint16_t ids[MAX_BANKS];
    Py_ssize_t digest_size[MAX_BANKS];
    PyObject *column[MAX_BANKS];
    Py_ssize_t held = 0; /* columns referenced */
    Py_ssize_t header = 12 + 4; /* pcrIndex, eventType, digests.count ... eventSize */
    int startup = 0;

    if (banks < 1 || banks > MAX_BANKS || PyTuple_GET_SIZE(sizes) != banks
        || PyList_GET_SIZE(columns) != banks) {
        PyErr_SetString(PyExc_ValueError, "walk_records: 1 to 8 banks, one size and column each");
        goto fail;
    }
    if (offset < 0 || offset > end || max_records < 0 || max_data < 0 || max_pcr >= PCR_COUNT) {
        PyErr_SetString(PyExc_ValueError, "walk_records: offset or limit out of range");
        goto fail;
    }
    for (Py_ssize_t k = 0; k < banks; k++) {
        PyObject *id_obj = PyTuple_GET_ITEM(alg_ids, k), *size_obj = PyTuple_GET_ITEM(sizes, k);
        if (!PyLong_Check(id_obj) || !PyLong_Check(size_obj)) {
            PyErr_SetString(PyExc_ValueError, "walk_records: algorithm ids and sizes are ints");
            goto fail;
        }
        long id = PyLong_AsLong(id_obj);
        Py_ssize_t size = PyLong_AsSsize_t(size_obj);
        if (PyErr_Occurred())
            goto fail;
        if (id < 0 || id > 0xFFFF || size < 1 || size > MAX_DIGEST
            || !PyList_Check(PyList_GET_ITEM(columns, k))) {
            PyErr_SetString(PyExc_ValueError, "walk_records: bad algorithm id, size or column");
            goto fail;
        }
        ids[k] = (uint16_t)id;
        digest_size[k] = size;
        header += 2 + size;
    }
    /* Own the columns: an append may run a collection, and a finalizer could in
       principle drop them from the outer list. */
    for (Py_ssize_t k = 0; k < banks; k++) {
        column[k] = PyList_GET_ITEM(columns, k);
        Py_INCREF(column[k]);
    }
    held = banks;
    if (stop_at > end)
        stop_at = end;
    const Py_ssize_t marker_len = PyBytes_GET_SIZE(marker);
    const char *marker_bytes = PyBytes_AS_STRING(marker);

    while (offset < stop_at && PyList_GET_SIZE(offsets) < max_records) {
        if (end - offset < header)
            break;
        const unsigned char *p = data + offset;
        uint32_t pcr = le32(p), event_type = le32(p + 4), count = le32(p + 8);
        if (pcr > max_pcr || count != (uint32_t)banks)
            break;
        Py_ssize_t at = 12;
        Py_ssize_t k = 0;
        for (; k < banks && le16(p + at) == ids[k]; k++)
            at += 2 + digest_size[k];
        if (k < banks)
            break;
        uint32_t size = le32(p + at); /* at == header - 4 */
        if ((Py_ssize_t)size > max_data || (Py_ssize_t)size > end - offset - header)
            break;
        const Py_ssize_t data_start = offset + header;
        const Py_ssize_t record_end = data_start + (Py_ssize_t)size;
        if (append_new(offsets, PyLong_FromSsize_t(offset)) < 0
            || append_new(ends, PyLong_FromSsize_t(record_end)) < 0
            || append_new(starts, PyLong_FromSsize_t(data_start)) < 0
            || append_new(pcrs, PyLong_FromUnsignedLong(pcr)) < 0
            || append_new(types, PyLong_FromUnsignedLong(event_type)) < 0)
            goto fail;
        at = 12;
        for (k = 0; k < banks; k++) {
            PyObject *digest = PyBytes_FromStringAndSize((const char *)p + at + 2, digest_size[k]);
            if (append_new(column[k], digest) < 0)
                goto fail;
            at += 2 + digest_size[k];
        }
        if (!startup && pcr == 0 && (Py_ssize_t)event_type == marker_type
            && (Py_ssize_t)size >= marker_len
            && memcmp(data + data_start, marker_bytes, (size_t)marker_len) == 0)
            startup = 1;
        offset = record_end;
    }
    PyBuffer_Release(&buf);
    for (Py_ssize_t k = 0; k < held; k++)
        Py_DECREF(column[k]);
    return Py_BuildValue("(nO)", offset, startup ? Py_True : Py_False);

fail:
    PyBuffer_Release(&buf);
    for (Py_ssize_t k = 0; k < held; k++)
        Py_DECREF(column[k]);
    return NULL;
}

static PyObject *
extend_bank(PyObject *self, PyObject *args)
{
    const char *name;
    PyObject *pcrs, *types, *digests, *initial;
    Py_ssize_t skip_type;
    if (!PyArg_ParseTuple(args, "sO!O!O!nO!:extend_bank", &name, &PyList_Type, &pcrs,
                          &PyList_Type, &types, &PyList_Type, &digests, &skip_type,
                          &PyDict_Type, &initial))
        return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(pcrs);
    if (PyList_GET_SIZE(types) != n || PyList_GET_SIZE(digests) != n) {
        PyErr_SetString(PyExc_ValueError, "extend_bank: pcrs, types and digests differ in length");
        return NULL;
    }
    EVP_MD *md = EVP_MD_fetch(NULL, name, NULL);
    if (md == NULL) {
        PyErr_Format(PyExc_LookupError, "extend_bank: OpenSSL has no digest %s", name);
        return NULL;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    PyObject *out = NULL;
    const int size = EVP_MD_get_size(md);
    unsigned char value[PCR_COUNT][EVP_MAX_MD_SIZE];
    char used[PCR_COUNT] = {0};
    if (ctx == NULL || size < 1 || size > EVP_MAX_MD_SIZE) {
        PyErr_SetString(PyExc_RuntimeError, "extend_bank: OpenSSL digest context");
        goto done;
    }

    PyObject *key, *item;
    Py_ssize_t pos = 0;
    while (PyDict_Next(initial, &pos, &key, &item)) {
        if (!PyLong_Check(key)) {
            PyErr_SetString(PyExc_ValueError, "extend_bank: initial values are {0..23: digest}");
            goto done;
        }
        long index = PyLong_AsLong(key);
        if (index == -1 && PyErr_Occurred())
            goto done;
        if (index < 0 || index >= PCR_COUNT || !PyBytes_Check(item) || PyBytes_GET_SIZE(item) != size) {
            PyErr_SetString(PyExc_ValueError, "extend_bank: initial values are {0..23: digest}");
            goto done;
        }
        memcpy(value[index], PyBytes_AS_STRING(item), (size_t)size);
        used[index] = 1;
    }
    /* Items are borrowed: only ints are read (never through __index__), so no
       Python code runs in this loop and the lists cannot change under it. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *digest = PyList_GET_ITEM(digests, i);
        PyObject *type_obj = PyList_GET_ITEM(types, i), *pcr_obj = PyList_GET_ITEM(pcrs, i);
        if (!PyLong_Check(type_obj) || !PyLong_Check(pcr_obj)) {
            PyErr_Format(PyExc_ValueError, "extend_bank: event %zd: PCR and type are ints", i);
            goto done;
        }
        Py_ssize_t event_type = PyLong_AsSsize_t(type_obj);
        long index = PyLong_AsLong(pcr_obj);
        if (PyErr_Occurred())
            goto done;
        if (event_type == skip_type || digest == Py_None)
            continue; /* EV_NO_ACTION is never extended (PFP 10.4.1) */
        if (index < 0 || index >= PCR_COUNT || !PyBytes_Check(digest)
            || PyBytes_GET_SIZE(digest) != size) {
            PyErr_Format(PyExc_ValueError, "extend_bank: event %zd: PCR or digest size", i);
            goto done;
        }
        if (!used[index]) {
            memset(value[index], 0, (size_t)size);
            used[index] = 1;
        }
        unsigned int written = 0;
        if (!EVP_DigestInit_ex2(ctx, md, NULL)
            || !EVP_DigestUpdate(ctx, value[index], (size_t)size)
            || !EVP_DigestUpdate(ctx, PyBytes_AS_STRING(digest), (size_t)size)
            || !EVP_DigestFinal_ex(ctx, value[index], &written) || (int)written != size) {
            PyErr_SetString(PyExc_RuntimeError, "extend_bank: OpenSSL digest failed");
            goto done;
        }
    }
    out = PyDict_New();
    for (int index = 0; out != NULL && index < PCR_COUNT; index++) {
        if (!used[index])
            continue;
        PyObject *k = PyLong_FromLong(index);
        PyObject *v = PyBytes_FromStringAndSize((const char *)value[index], size);
        if (k == NULL || v == NULL || PyDict_SetItem(out, k, v) < 0)
            Py_CLEAR(out);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
done:
    EVP_MD_CTX_free(ctx);
    EVP_MD_free(md);
    return out;
}

static PyMethodDef methods[] = {
    {"walk_records", walk_records, METH_VARARGS,
     "Append the well-formed TCG_PCR_EVENT2 records from offset to the columns; "
     "return (offset of the first record not taken, whether a StartupLocality event was)."},
    {"extend_bank", extend_bank, METH_VARARGS,
     "Replay one bank: PCR := H(PCR || digest) per event not of skip_type; {pcr: value}."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *m)
{
    return PyModule_AddIntConstant(m, "MAX_BANKS", MAX_BANKS);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "verifier.eventlog._native",
    .m_doc = "Event-log record walk and PCR replay in C (see _native.pyi).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&module);
}
