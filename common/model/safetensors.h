/* The safetensors file format: a reader that maps a file read-only and
 * validates its whole header before anything is used, and an atomic writer.
 * modelfile.c reads base models with it; adapters and exports are written
 * with it. Format: 8-byte little-endian header length N, N bytes of JSON
 * {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}},
 * then the tensor data, offsets relative to the end of the header. */
#ifndef PEFTPS_SAFETENSORS_H
#define PEFTPS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"

/* More dimensions than any model uses; a header with more is rejected. */
#define ST_MAX_DIMS 8

/* Byte-sized dtypes of the format. The sub-byte ones (F4, F6_*) are
 * recognised by name only to be refused with a clear message. */
typedef enum {
    ST_BOOL = 0,
    ST_U8,
    ST_I8,
    ST_F8_E5M2,
    ST_F8_E4M3,
    ST_F8_E8M0,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_C64,
    ST_F64,
    ST_I64,
    ST_U64,
    ST_DTYPE_COUNT
} st_dtype;

/* One tensor of an open file. `data` points into the mapping (or the
 * caller's buffer for st_open_memory) and may be unaligned. */
typedef struct st_tensor {
    const char *name;
    st_dtype dtype;
    int ndim; /* 0 for a scalar */
    int64_t shape[ST_MAX_DIMS];
    size_t numel;  /* product of shape; 1 for a scalar */
    size_t nbytes; /* numel * st_dtype_size(dtype) */
    size_t offset; /* data_offsets[0], from the start of the data section */
    const void *data;
} st_tensor;

typedef struct st_file st_file;

/* Bytes per element of a dtype (0 for an invalid value). */
size_t st_dtype_size(st_dtype t);
/* The format's name of a dtype ("F32", "BF16", ...); "?" for an invalid value. */
const char *st_dtype_name(st_dtype t);
/* Parses a dtype name; returns 0, or -1 (e set) for a name the format does
 * not define, a sub-byte dtype, or NULL. */
int st_dtype_parse(const char *name, st_dtype *out, err *e);

/* Opens and maps `path` read-only (PROT_READ, MAP_SHARED), so processes on
 * one machine share the page cache. Validates everything before returning:
 * header length within the file, the header a JSON object (duplicate keys
 * rejected), each entry a known dtype, a shape of at most ST_MAX_DIMS
 * non-negative integers, data_offsets [begin, end] within the data section
 * with end - begin == numel * dtype size (overflow checked), tensors
 * contiguous and covering the data section exactly, "__metadata__" an object
 * of strings. Every error names the file and, where it applies, the tensor. */
int st_open(st_file **out, const char *path, err *e);

/* The same validation over bytes in memory, which must outlive the returned
 * file (nothing is copied). `name` is used in messages. */
int st_open_memory(st_file **out, const void *buf, size_t len, const char *name, err *e);

/* Unmaps and frees; NULL is accepted. Pointers obtained from f die with it. */
void st_close(st_file *f);

/* The name given at open (the path). */
const char *st_path(const st_file *f);

/* Number of tensors; st_tensor_at(f, i) for i in [0, count) iterates them in
 * the order of their data in the file. */
int st_count(const st_file *f);
const st_tensor *st_tensor_at(const st_file *f, int i);

/* The tensor named `name`, or NULL. O(log n). */
const st_tensor *st_find(const st_file *f, const char *name);

/* Metadata: number of "__metadata__" pairs, the i-th (sorted by key), and
 * the value of a key (NULL when absent). */
int st_metadata_count(const st_file *f);
void st_metadata_at(const st_file *f, int i, const char **key, const char **value);
const char *st_metadata_get(const st_file *f, const char *key);

/* The raw JSON header bytes (without the 8-byte length and without being
 * NUL-terminated), e.g. for fingerprints. */
const void *st_header(const st_file *f, size_t *len);

/* Converts a floating tensor to F32 into dst (t->numel floats): F32 copied,
 * F16 and BF16 converted exactly (subnormals, infinities and NaN kept).
 * Other dtypes fail with a message naming the file, tensor and dtype. */
int st_convert_f32(const st_file *f, const st_tensor *t, float *dst, err *e);

/* Converts a floating tensor to BF16 into dst (t->numel values): BF16
 * copied, F32 and F16 rounded to nearest even (F16 through its exact F32
 * value). Other dtypes fail as st_convert_f32. */
int st_convert_bf16(const st_file *f, const st_tensor *t, uint16_t *dst, err *e);

/* F32 view of tensor `name`: an aligned F32 tensor is returned in place
 * (*data into the mapping, *owned = NULL); otherwise *data = *owned = a new
 * array (free it) holding the converted values. *info (may be NULL) gets the
 * tensor. Fails when the tensor is absent, not a float type, or on ENOMEM. */
int st_get_f32(const st_file *f, const char *name, const float **data, float **owned,
               const st_tensor **info, err *e);

/* Exact scalar conversions to F32, and round-to-nearest-even conversions
 * from F32 (NaN stays NaN; overflow to F16 gives infinity). */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t h);
uint16_t st_f32_to_f16(float f);
uint16_t st_f32_to_bf16(float f);

/* One tensor to write: data holds numel * dtype size bytes, little-endian. */
typedef struct st_entry {
    const char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
} st_entry;

/* Writes n tensors, data in the order given, with an optional metadata
 * JSON object of string values (NULL: none). The header is padded with
 * spaces to a multiple of 8 bytes so that data stays aligned. Written to a
 * temporary file in the same directory, fsync'ed, then renamed over path:
 * readers see the old file or the new one, never a partial one. Fails on
 * empty or duplicate names, the reserved name "__metadata__", bad shapes or
 * dtypes, malformed metadata and I/O errors, naming the path. */
int st_write(const char *path, const st_entry *entries, int n, const char *metadata_json, err *e);

#endif
