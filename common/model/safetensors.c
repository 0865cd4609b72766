/* Reader and writer of safetensors files; see safetensors.h. The header is
 * parsed with jansson and checked completely (fuzzed by
 * tests/fuzz/fuzz_safetensors.c) before any tensor pointer is handed out. */
#include "model/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader uses it in place"
#endif

/* The reference implementation refuses larger headers too; it bounds the
 * memory a hostile file can make the JSON parser use. */
#define ST_MAX_HEADER (100u * 1000 * 1000)

struct st_file {
    char *path;
    const uint8_t *base; /* whole file */
    size_t len;
    int mapped; /* base is our mapping */
    const uint8_t *header;
    size_t header_len;
    const uint8_t *data;
    size_t data_len;
    st_tensor *tensors; /* by offset */
    int n;
    const st_tensor **by_name; /* sorted by name */
    struct st_meta {
        char *key, *value;
    } * meta; /* sorted by key */
    int n_meta;
};

static const struct {
    const char *name;
    size_t size;
} dtypes[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 1},       [ST_U8] = {"U8", 1},           [ST_I8] = {"I8", 1},
    [ST_F8_E5M2] = {"F8_E5M2", 1}, [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E8M0] = {"F8_E8M0", 1},
    [ST_I16] = {"I16", 2},         [ST_U16] = {"U16", 2},         [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2},       [ST_I32] = {"I32", 4},         [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},         [ST_C64] = {"C64", 8},         [ST_F64] = {"F64", 8},
    [ST_I64] = {"I64", 8},         [ST_U64] = {"U64", 8},
};

size_t st_dtype_size(st_dtype t) {
    return (unsigned)t < ST_DTYPE_COUNT ? dtypes[t].size : 0;
}

const char *st_dtype_name(st_dtype t) {
    return (unsigned)t < ST_DTYPE_COUNT ? dtypes[t].name : "?";
}

int st_dtype_parse(const char *name, st_dtype *out, err *e) {
    if (!name) return err_set(e, "dtype missing");
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(name, dtypes[i].name) == 0) {
            *out = (st_dtype)i;
            return 0;
        }
    if (strcmp(name, "F4") == 0 || strncmp(name, "F6_", 3) == 0)
        return err_set(e, "dtype %s packs elements below one byte and is not supported", name);
    return err_set(e, "unknown dtype \"%.64s\"", name);
}

/* ---- half-precision conversions ------------------------------------------ */

static float bits_to_f32(uint32_t x) {
    float f;
    memcpy(&f, &x, 4);
    return f;
}

float st_bf16_to_f32(uint16_t h) {
    return bits_to_f32((uint32_t)h << 16);
}

float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24, exact in F32. */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | mant << 13); /* inf, NaN payload */
    return bits_to_f32(sign | (exp + 112) << 23 | mant << 13);
}

uint16_t st_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(x >> 16 | 0x40); /* quiet NaN */
    return (uint16_t)((x + 0x7fffu + (x >> 16 & 1)) >> 16);
}

uint16_t st_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)(x >> 16 & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00 | (uint16_t)(ax >> 13 & 0x3ff); /* NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00; /* 65520 and up round to infinity */
    if (ax >= 0x38800000u) {                     /* normal half */
        uint32_t r = ax + 0xfffu + (ax >> 13 & 1);
        return sign | (uint16_t)((r - 0x38000000u) >> 13);
    }
    if (ax < 0x33000000u) return sign; /* at most 2^-25: rounds to zero */
    /* Subnormal half: the count of 2^-24 units, rounded to nearest even. */
    uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    int shift = (int)(126 - e);
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return sign | (uint16_t)r;
}

/* ---- reader ---------------------------------------------------------------- */

static void shape_str(const int64_t *shape, int ndim, char *buf, size_t n) {
    size_t k = 0;
    k += (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static int cmp_offset(const void *a, const void *b) {
    const st_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    /* Zero-size tensors sit before a non-empty one at the same offset. */
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(const st_tensor *const *)a)->name, (*(const st_tensor *const *)b)->name);
}

static int cmp_meta(const void *a, const void *b) {
    return strcmp(((const struct st_meta *)a)->key, ((const struct st_meta *)b)->key);
}

/* Fills t from one header entry; messages are completed by the caller with
 * the file and tensor names. */
static int parse_entry(st_tensor *t, json_t *v, size_t data_len, err *e) {
    if (!json_is_object(v)) return err_set(e, "entry is not a JSON object");
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape");
    json_t *jo = json_object_get(v, "data_offsets");
    if (!jd) return err_set(e, "missing \"dtype\"");
    if (!json_is_string(jd)) return err_set(e, "\"dtype\" is not a string");
    if (st_dtype_parse(json_string_value(jd), &t->dtype, e)) return -1;
    if (!js) return err_set(e, "missing \"shape\"");
    if (!json_is_array(js)) return err_set(e, "\"shape\" is not an array");
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS)
        return err_set(e, "shape has %zu dimensions, more than the %d supported", nd, ST_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d)) return err_set(e, "shape[%zu] is not an integer", i);
        json_int_t x = json_integer_value(d);
        if (x < 0) return err_set(e, "shape[%zu] is negative (%lld)", i, (long long)x);
        t->shape[i] = (int64_t)x;
        if (__builtin_mul_overflow(numel, (uint64_t)x, &numel))
            return err_set(e, "shape overflows the element count");
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, (uint64_t)dtypes[t->dtype].size, &nbytes) ||
        nbytes > SIZE_MAX)
        return err_set(e, "shape overflows the byte count");
    t->numel = (size_t)numel;
    t->nbytes = (size_t)nbytes;
    if (!jo) return err_set(e, "missing \"data_offsets\"");
    if (!json_is_array(jo) || json_array_size(jo) != 2)
        return err_set(e, "\"data_offsets\" is not an array of two integers");
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je))
        return err_set(e, "\"data_offsets\" is not an array of two integers");
    json_int_t b = json_integer_value(jb), en = json_integer_value(je);
    if (b < 0 || en < 0 || b > en)
        return err_set(e, "data_offsets [%lld, %lld] are not an ascending pair of offsets",
                       (long long)b, (long long)en);
    if ((uint64_t)en > data_len)
        return err_set(e,
                       "data_offsets [%lld, %lld] reach beyond the data section (%zu bytes; "
                       "file truncated?)",
                       (long long)b, (long long)en, data_len);
    if ((uint64_t)(en - b) != nbytes) {
        char s[256];
        shape_str(t->shape, t->ndim, s, sizeof s);
        return err_set(e, "data_offsets [%lld, %lld] do not match shape %s of %s (%llu bytes)",
                       (long long)b, (long long)en, s, dtypes[t->dtype].name,
                       (unsigned long long)nbytes);
    }
    t->offset = (size_t)b;
    return 0;
}

static int parse_metadata(st_file *f, json_t *m, err *e) {
    if (!json_is_object(m)) return err_set(e, "%s: \"__metadata__\" is not a JSON object", f->path);
    size_t n = json_object_size(m);
    f->meta = calloc(n ? n : 1, sizeof *f->meta);
    if (!f->meta) return err_set(e, "%s: out of memory", f->path);
    const char *k;
    json_t *v;
    json_object_foreach(m, k, v) {
        if (!json_is_string(v))
            return err_set(e, "%s: \"__metadata__\" value of \"%.200s\" is not a string", f->path,
                           k);
        struct st_meta *p = &f->meta[f->n_meta++];
        p->key = strdup(k);
        p->value = strdup(json_string_value(v));
        if (!p->key || !p->value) return err_set(e, "%s: out of memory", f->path);
    }
    qsort(f->meta, (size_t)f->n_meta, sizeof *f->meta, cmp_meta);
    return 0;
}

static int parse(st_file *f, err *e) {
    if (f->len < 8)
        return err_set(e, "%s: file is %zu bytes, shorter than the 8-byte header length", f->path,
                       f->len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | f->base[i];
    if (n == 0) return err_set(e, "%s: header length is 0", f->path);
    if (n > f->len - 8)
        return err_set(e,
                       "%s: header length %llu exceeds the %zu bytes that follow it (file "
                       "truncated or not safetensors?)",
                       f->path, (unsigned long long)n, f->len - 8);
    if (n > ST_MAX_HEADER)
        return err_set(e, "%s: header length %llu is over the %u-byte limit", f->path,
                       (unsigned long long)n, ST_MAX_HEADER);
    f->header = f->base + 8;
    f->header_len = (size_t)n;
    f->data = f->header + n;
    f->data_len = f->len - 8 - (size_t)n;

    json_error_t je;
    json_t *root = json_loadb((const char *)f->header, f->header_len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return err_set(e, "%s: header is not valid JSON: %s (header byte %d)", f->path, je.text,
                       je.position);
    int rc = -1;
    if (!json_is_object(root)) {
        err_set(e, "%s: header is not a JSON object", f->path);
        goto out;
    }
    json_t *meta = json_object_get(root, "__metadata__");
    size_t count = json_object_size(root) - (meta ? 1 : 0);
    if (count > INT_MAX) {
        err_set(e, "%s: too many tensors", f->path);
        goto out;
    }
    f->tensors = calloc(count ? count : 1, sizeof *f->tensors);
    f->by_name = malloc((count ? count : 1) * sizeof *f->by_name);
    if (!f->tensors || !f->by_name) {
        err_set(e, "%s: out of memory for %zu tensors", f->path, count);
        goto out;
    }
    if (meta && parse_metadata(f, meta, e)) goto out;
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v) {
        if (strcmp(k, "__metadata__") == 0) continue;
        st_tensor *t = &f->tensors[f->n];
        if (parse_entry(t, v, f->data_len, e)) {
            err_wrap(e, "%s: tensor '%.200s'", f->path, k);
            goto out;
        }
        if (!(t->name = strdup(k))) {
            err_set(e, "%s: out of memory", f->path);
            goto out;
        }
        t->data = f->data + t->offset;
        f->n++;
    }
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, cmp_offset);
    size_t expect = 0;
    for (int i = 0; i < f->n; i++) {
        const st_tensor *t = &f->tensors[i];
        if (t->offset < expect) {
            err_set(e, "%s: tensor '%.200s' at data_offsets [%zu, %zu] overlaps tensor '%.200s'",
                    f->path, t->name, t->offset, t->offset + t->nbytes, f->tensors[i - 1].name);
            goto out;
        }
        if (t->offset > expect) {
            err_set(e, "%s: gap of %zu bytes in the data section before tensor '%.200s'", f->path,
                    t->offset - expect, t->name);
            goto out;
        }
        expect = t->offset + t->nbytes;
    }
    if (expect != f->data_len) {
        err_set(e,
                "%s: tensors cover %zu bytes but the data section holds %zu (trailing bytes "
                "after the last tensor)",
                f->path, expect, f->data_len);
        goto out;
    }
    for (int i = 0; i < f->n; i++) f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_name);
    rc = 0;
out:
    json_decref(root);
    return rc;
}

static st_file *new_file(const char *name, err *e) {
    st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(name ? name : "(memory)"))) {
        free(f);
        err_set(e, "%s: out of memory", name ? name : "(memory)");
        return NULL;
    }
    return f;
}

int st_open_memory(st_file **out, const void *buf, size_t len, const char *name, err *e) {
    *out = NULL;
    st_file *f = new_file(name, e);
    if (!f) return -1;
    f->base = buf;
    f->len = len;
    if (parse(f, e)) {
        st_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

int st_open(st_file **out, const char *path, err *e) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_errno(e, "%s", path);
    struct stat sb;
    if (fstat(fd, &sb)) {
        err_errno(e, "%s", path);
        close(fd);
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(e, "%s: not a regular file", path);
    }
    st_file *f = new_file(path, e);
    if (!f) {
        close(fd);
        return -1;
    }
    f->len = (size_t)sb.st_size;
    if (f->len > 0) {
        void *p = mmap(NULL, f->len, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            err_errno(e, "%s: mmap of %zu bytes", path, f->len);
            close(fd);
            st_close(f);
            return -1;
        }
        f->base = p;
        f->mapped = 1;
    }
    close(fd);
    if (parse(f, e)) {
        st_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

void st_close(st_file *f) {
    if (!f) return;
    if (f->mapped) munmap((void *)f->base, f->len);
    for (int i = 0; i < f->n; i++) free((char *)f->tensors[i].name);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta[i].key);
        free(f->meta[i].value);
    }
    free(f->meta);
    free(f->tensors);
    free(f->by_name);
    free(f->path);
    free(f);
}

const char *st_path(const st_file *f) {
    return f->path;
}

int st_count(const st_file *f) {
    return f->n;
}

const st_tensor *st_tensor_at(const st_file *f, int i) {
    return i >= 0 && i < f->n ? &f->tensors[i] : NULL;
}

const st_tensor *st_find(const st_file *f, const char *name) {
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const st_tensor *t = f->by_name[mid];
        int c = strcmp(name, t->name);
        if (c == 0) return t;
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

int st_metadata_count(const st_file *f) {
    return f->n_meta;
}

void st_metadata_at(const st_file *f, int i, const char **key, const char **value) {
    int ok = i >= 0 && i < f->n_meta;
    if (key) *key = ok ? f->meta[i].key : NULL;
    if (value) *value = ok ? f->meta[i].value : NULL;
}

const char *st_metadata_get(const st_file *f, const char *key) {
    struct st_meta k = {(char *)key, NULL};
    const struct st_meta *p =
        f->n_meta ? bsearch(&k, f->meta, (size_t)f->n_meta, sizeof *f->meta, cmp_meta) : NULL;
    return p ? p->value : NULL;
}

const void *st_header(const st_file *f, size_t *len) {
    if (len) *len = f->header_len;
    return f->header;
}

int st_convert_f32(const st_file *f, const st_tensor *t, float *dst, err *e) {
    const uint8_t *s = t->data;
    switch (t->dtype) {
    case ST_F32:
        if (t->nbytes) memcpy(dst, s, t->nbytes);
        return 0;
    case ST_F16:
        for (size_t i = 0; i < t->numel; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = st_f16_to_f32(h);
        }
        return 0;
    case ST_BF16:
        for (size_t i = 0; i < t->numel; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = st_bf16_to_f32(h);
        }
        return 0;
    default:
        return err_set(e, "%s: tensor '%.200s' has dtype %s; expected F32, F16 or BF16", f->path,
                       t->name, st_dtype_name(t->dtype));
    }
}

int st_convert_bf16(const st_file *f, const st_tensor *t, uint16_t *dst, err *e) {
    const uint8_t *s = t->data;
    switch (t->dtype) {
    case ST_BF16:
        if (t->nbytes) memcpy(dst, s, t->nbytes);
        return 0;
    case ST_F32:
    case ST_F16:
        for (size_t i = 0; i < t->numel; i++) {
            float v;
            if (t->dtype == ST_F32) {
                memcpy(&v, s + 4 * i, 4);
            } else {
                uint16_t h;
                memcpy(&h, s + 2 * i, 2);
                v = st_f16_to_f32(h);
            }
            dst[i] = st_f32_to_bf16(v);
        }
        return 0;
    default:
        return err_set(e, "%s: tensor '%.200s' has dtype %s; expected F32, F16 or BF16", f->path,
                       t->name, st_dtype_name(t->dtype));
    }
}

int st_get_f32(const st_file *f, const char *name, const float **data, float **owned,
               const st_tensor **info, err *e) {
    *data = NULL;
    *owned = NULL;
    const st_tensor *t = st_find(f, name);
    if (!t) return err_set(e, "%s: no tensor '%.200s'", f->path, name);
    if (info) *info = t;
    if (t->dtype == ST_F32 && (uintptr_t)t->data % _Alignof(float) == 0) {
        *data = t->data;
        return 0;
    }
    float *buf = malloc(t->numel ? t->numel * sizeof *buf : 1);
    if (!buf)
        return err_set(e, "%s: tensor '%.200s': out of memory for %zu floats", f->path, name,
                       t->numel);
    if (st_convert_f32(f, t, buf, e)) {
        free(buf);
        return -1;
    }
    *data = *owned = buf;
    return 0;
}

/* ---- writer ---------------------------------------------------------------- */

static int write_all(int fd, const void *p, size_t n) {
    const char *s = p;
    while (n) {
        ssize_t w = write(fd, s, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Builds the header JSON and the byte size of each entry's data. */
static char *build_header(const char *path, const st_entry *en, int n, const char *metadata_json,
                          size_t *sizes, err *e) {
    json_t *root = json_object();
    char *text = NULL;
    if (!root) {
        err_set(e, "%s: out of memory", path);
        return NULL;
    }
    if (metadata_json) {
        json_error_t je;
        json_t *m = json_loads(metadata_json, JSON_REJECT_DUPLICATES, &je);
        if (!m) {
            err_set(e, "%s: metadata is not valid JSON: %s", path, je.text);
            goto out;
        }
        if (!json_is_object(m)) {
            err_set(e, "%s: metadata is not a JSON object", path);
            json_decref(m);
            goto out;
        }
        const char *k;
        json_t *v;
        json_object_foreach(m, k, v) {
            if (!json_is_string(v)) {
                err_set(e, "%s: metadata value of \"%.200s\" is not a string", path, k);
                json_decref(m);
                goto out;
            }
        }
        json_object_set_new(root, "__metadata__", m);
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const st_entry *t = &en[i];
        const char *name = t->name ? t->name : "";
        if (!*name || strcmp(name, "__metadata__") == 0) {
            err_set(e, "%s: entry %d: invalid tensor name \"%s\"", path, i, name);
            goto out;
        }
        if (json_object_get(root, name)) {
            err_set(e, "%s: tensor '%.200s' appears twice", path, name);
            goto out;
        }
        if ((unsigned)t->dtype >= ST_DTYPE_COUNT || t->ndim < 0 || t->ndim > ST_MAX_DIMS) {
            err_set(e, "%s: tensor '%.200s': invalid dtype or number of dimensions", path, name);
            goto out;
        }
        uint64_t nb = dtypes[t->dtype].size;
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0 || __builtin_mul_overflow(nb, (uint64_t)t->shape[d], &nb)) {
                json_decref(shape);
                err_set(e, "%s: tensor '%.200s': invalid shape", path, name);
                goto out;
            }
            json_array_append_new(shape, json_integer(t->shape[d]));
        }
        if (nb && !t->data) {
            json_decref(shape);
            err_set(e, "%s: tensor '%.200s': no data", path, name);
            goto out;
        }
        sizes[i] = (size_t)nb;
        json_t *ent = json_pack("{s:s, s:o, s:[I,I]}", "dtype", dtypes[t->dtype].name, "shape",
                                shape, "data_offsets", (json_int_t)off, (json_int_t)(off + nb));
        if (!ent || json_object_set_new(root, name, ent)) {
            err_set(e, "%s: tensor '%.200s': name is not valid UTF-8 or out of memory", path, name);
            goto out;
        }
        off += nb;
    }
    text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!text) err_set(e, "%s: cannot serialise the header", path);
out:
    json_decref(root);
    return text;
}

int st_write(const char *path, const st_entry *entries, int n, const char *metadata_json, err *e) {
    if (n < 0) return err_set(e, "%s: negative tensor count", path);
    size_t *sizes = calloc((size_t)n + 1, sizeof *sizes);
    if (!sizes) return err_set(e, "%s: out of memory", path);
    char *text = build_header(path, entries, n, metadata_json, sizes, e);
    if (!text) {
        free(sizes);
        return -1;
    }
    size_t hlen = strlen(text), padded = (hlen + 7) & ~(size_t)7;
    char *tmp = malloc(strlen(path) + 16);
    int fd = -1, rc = -1, created = 0;
    if (!tmp) {
        err_set(e, "%s: out of memory", path);
        goto out;
    }
    sprintf(tmp, "%s.tmp.XXXXXX", path);
    fd = mkstemp(tmp);
    if (fd < 0) {
        err_errno(e, "%s: creating temporary file", path);
        goto out;
    }
    created = 1;
    uint8_t prefix[8];
    for (int i = 0; i < 8; i++) prefix[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    static const char spaces[8] = "        ";
    int bad = fchmod(fd, 0644) || write_all(fd, prefix, 8) || write_all(fd, text, hlen) ||
              write_all(fd, spaces, padded - hlen);
    for (int i = 0; i < n && !bad; i++) bad = write_all(fd, entries[i].data, sizes[i]);
    if (bad || fsync(fd)) {
        err_errno(e, "%s: writing", tmp);
        goto out;
    }
    if (close(fd)) {
        fd = -1;
        err_errno(e, "%s: closing", tmp);
        goto out;
    }
    fd = -1;
    if (rename(tmp, path)) {
        err_errno(e, "%s: renaming %s into place", path, tmp);
        goto out;
    }
    created = 0;
    /* Make the rename itself durable; failing here loses nothing already
     * visible, so it is not reported. */
    char *slash = strrchr(tmp, '/');
    if (slash) *slash = '\0';
    int dfd = open(slash ? tmp : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    rc = 0;
out:
    if (fd >= 0) close(fd);
    if (created) unlink(tmp);
    free(tmp);
    free(text);
    free(sizes);
    return rc;
}
