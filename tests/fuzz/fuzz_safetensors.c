/* libFuzzer target for the safetensors reader (common/model/safetensors.c): any
 * byte string must either open, with every tensor inside the input, or fail
 * with a message; never crash or read out of bounds. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_file *f;
    err e;
    if (st_open_memory(&f, data, size, "fuzz.safetensors", &e)) {
        if (f || strncmp(e.msg, "fuzz.safetensors: ", 18) != 0) abort();
        return 0;
    }
    /* Touch every byte that the reader claims is in bounds, and look every
     * tensor up by name, so ASan checks the claims. */
    unsigned sum = 0;
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_tensor_at(f, i);
        const uint8_t *p = t->data;
        if (p < data || p + t->nbytes > data + size) abort();
        for (size_t k = 0; k < t->nbytes; k++) sum += p[k];
        if (st_find(f, t->name) != t) abort();
        const float *v;
        float *owned;
        if (st_get_f32(f, t->name, &v, &owned, NULL, &e) == 0) {
            for (size_t k = 0; k < t->numel; k++) sum += (unsigned)(v[k] == v[k]);
            free(owned);
        }
    }
    for (int i = 0; i < st_metadata_count(f); i++) {
        const char *k, *v;
        st_metadata_at(f, i, &k, &v);
        if (st_metadata_get(f, k) != v) abort();
    }
    st_close(f);
    return (int)(sum & 0); /* libFuzzer wants 0 */
}
