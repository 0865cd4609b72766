/* The UTF-8 toolkit of utf8.h. */
#include "base/utf8.h"

size_t utf8_seq_len(unsigned char c) {
    return c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

/* The length of the sequence a lead byte c starts (2..4) and the range its
 * second byte must fall in; 0 when c cannot lead one. The narrowed ranges
 * refuse overlong forms, surrogates and values past U+10FFFF. */
static size_t utf8_lead(unsigned char c, unsigned char *lo, unsigned char *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) return 2;
    if (c >= 0xE0 && c <= 0xEF) {
        if (c == 0xE0) *lo = 0xA0;
        if (c == 0xED) *hi = 0x9F;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (c == 0xF0) *lo = 0x90;
        if (c == 0xF4) *hi = 0x8F;
        return 4;
    }
    return 0;
}

size_t utf8_valid_at(const unsigned char *s, size_t n) {
    if (s[0] < 0x80) return 1;
    unsigned char lo, hi;
    size_t len = utf8_lead(s[0], &lo, &hi);
    if (!len || n < 2 || s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k < len; k++)
        if (k >= n || s[k] < 0x80 || s[k] > 0xBF) return 0;
    return len;
}

int utf8_valid(const char *s, size_t n, size_t *bad) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t l = utf8_valid_at(u + i, n - i);
        if (!l) {
            if (bad) *bad = i;
            return 0;
        }
        i += l;
    }
    return 1;
}

uint32_t utf8_decode(const unsigned char *s, size_t *len) {
    size_t l = utf8_seq_len(s[0]);
    *len = l;
    if (l == 1) return s[0];
    uint32_t c = s[0] & (0xFF >> (l + 1));
    for (size_t k = 1; k < l; k++) c = (c << 6) | (s[k] & 0x3F);
    return c;
}

size_t utf8_encode(uint32_t c, char out[4]) {
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (char)(0xC0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (char)(0xE0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

uint32_t utf8_last(const char *s, size_t n, size_t *len) {
    size_t i = n - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    return utf8_decode((const unsigned char *)s + i, len);
}

size_t utf8_invalid_len(const unsigned char *s, size_t n) {
    unsigned char lo, hi;
    size_t want = utf8_lead(s[0], &lo, &hi), k = 1;
    if (want && n > 1 && s[1] >= lo && s[1] <= hi) {
        k = 2;
        while (k < want && k < n && s[k] >= 0x80 && s[k] <= 0xBF) k++;
    }
    return k;
}

int utf8_is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

size_t utf8_count(const char *s, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

size_t utf8_offset(const char *s, size_t n, size_t k) {
    size_t i = 0;
    while (i < n && k > 0) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80) i++;
        k--;
    }
    return i;
}
