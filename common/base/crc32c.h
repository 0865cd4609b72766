/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of
 * wire frames and checkpoint values (wire.c, ckpt.c). Table-driven,
 * slice-by-8; no CPU-specific instructions. */
#ifndef PEFTPS_CRC32C_H
#define PEFTPS_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC-32C over n bytes of p. Start with crc = 0; the result of
 * one call may be passed as crc to the next to checksum data in pieces:
 * crc32c(crc32c(0, a, na), b, nb) == crc32c(0, a||b, na+nb). Thread-safe. */
uint32_t crc32c(uint32_t crc, const void *p, size_t n);

#endif
