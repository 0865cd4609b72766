/* CRC-32C with slice-by-8 tables; see crc32c.h. The tables are built once,
 * on first use, guarded by pthread_once so concurrent first calls are safe. */
#include "base/crc32c.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82F63B78u

static uint32_t tab[8][256];
static pthread_once_t tab_once = PTHREAD_ONCE_INIT;

static void build_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (POLY & (0u - (c & 1)));
        tab[0][i] = c;
    }
    /* tab[k][i] is the CRC of byte i followed by k zero bytes, which lets
     * eight input bytes be folded with eight independent lookups. */
    for (int k = 1; k < 8; k++)
        for (int i = 0; i < 256; i++)
            tab[k][i] = (tab[k - 1][i] >> 8) ^ tab[0][tab[k - 1][i] & 0xff];
}

uint32_t crc32c(uint32_t crc, const void *p, size_t n) {
    pthread_once(&tab_once, build_tables);
    const uint8_t *s = p;
    crc = ~crc;
    for (; n && ((uintptr_t)s & 7); n--) crc = (crc >> 8) ^ tab[0][(crc ^ *s++) & 0xff];
    for (; n >= 8; n -= 8, s += 8) {
        /* Little-endian assembly by bytes: correct on any host byte order. */
        uint32_t lo = crc ^ ((uint32_t)s[0] | (uint32_t)s[1] << 8 | (uint32_t)s[2] << 16 |
                             (uint32_t)s[3] << 24);
        uint32_t hi =
            (uint32_t)s[4] | (uint32_t)s[5] << 8 | (uint32_t)s[6] << 16 | (uint32_t)s[7] << 24;
        crc = tab[7][lo & 0xff] ^ tab[6][(lo >> 8) & 0xff] ^ tab[5][(lo >> 16) & 0xff] ^
              tab[4][lo >> 24] ^ tab[3][hi & 0xff] ^ tab[2][(hi >> 8) & 0xff] ^
              tab[1][(hi >> 16) & 0xff] ^ tab[0][hi >> 24];
    }
    while (n--) crc = (crc >> 8) ^ tab[0][(crc ^ *s++) & 0xff];
    return ~crc;
}
