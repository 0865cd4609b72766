/* Checkpoints in an LMDB environment (layout and contracts in ckpt.h): one
 * write transaction per checkpoint with pruning, CRC-32C (crc32c.h) on every
 * value, map growth on MDB_MAP_FULL. Used by the parameter server and by
 * cli/cmd_inspect.c. */
#include "train/ckpt.h"
#include "base/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "base/crc32c.h"
#include "base/log.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "checkpoint arrays are stored as little-endian floats in host order");
_Static_assert(sizeof(float) == 4, "checkpoints store binary32 floats");

#define FORMAT_KEY "format"
#define FORMAT_VALUE "peftps-ckpt 1"
#define META_VERSION 1u
#define STEP_PREFIX "step/"
#define STEP_DIGITS 20
/* "step/" + 20 digits + "/" */
#define STEP_PREFIX_LEN (sizeof STEP_PREFIX - 1 + STEP_DIGITS + 1)
#define META_SIZE (4 + 8 * 4 + 4 + 4 + 8 + 64 + 64)
#define KEY_MAX (STEP_PREFIX_LEN + 5 + CKPT_BLOB_NAME_MAX + 1)
/* Doublings of the map one write may ask for before giving up. */
#define MAX_GROWTHS 48

struct ckpt {
    MDB_env *env;
    MDB_dbi dbi;
    int rdonly;
    int keep;
    char *dir;
    uint64_t file_size;   /* of data.mdb when last looked at (value_in_file) */
    const char *map_base; /* where LMDB mapped it */
};

/* ---- little-endian encoding ---------------------------------------------- */

static unsigned char *put_u32(unsigned char *p, uint32_t x) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(x >> (8 * i));
    return p + 4;
}

static unsigned char *put_u64(unsigned char *p, uint64_t x) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(x >> (8 * i));
    return p + 8;
}

static uint32_t get_u32(const unsigned char *p) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) x |= (uint32_t)p[i] << (8 * i);
    return x;
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)p[i] << (8 * i);
    return x;
}

/* A bounded reader over one value, so that a malformed table is an error
 * rather than a read past its end. */
typedef struct reader {
    const unsigned char *p, *end;
} reader;

static int rd_u32(reader *r, uint32_t *x) {
    if (r->end - r->p < 4) return -1;
    *x = get_u32(r->p);
    r->p += 4;
    return 0;
}

static int rd_u64(reader *r, uint64_t *x) {
    if (r->end - r->p < 8) return -1;
    *x = get_u64(r->p);
    r->p += 8;
    return 0;
}

/* ---- keys and checked values --------------------------------------------- */

static void step_key(char *buf, uint64_t step, const char *field) {
    snprintf(buf, KEY_MAX, STEP_PREFIX "%020" PRIu64 "/%s", step, field);
}

static uint32_t value_crc(const MDB_val *key, const void *payload, size_t n) {
    return crc32c(crc32c(0, key->mv_data, key->mv_size), payload, n);
}

/* Stores payload + CRC under key, writing straight into the map. Returns the
 * LMDB code, so the caller can tell MDB_MAP_FULL from other failures. */
static int put_value(MDB_txn *txn, MDB_dbi dbi, const char *k, const void *payload, size_t n) {
    MDB_val key = {strlen(k), (void *)k}, val = {n + 4, NULL};
    int rc = mdb_put(txn, dbi, &key, &val, MDB_RESERVE);
    if (rc) return rc;
    if (n) memcpy(val.mv_data, payload, n);
    put_u32((unsigned char *)val.mv_data + n, value_crc(&key, payload, n));
    return 0;
}

static int value_in_file(ckpt *c, const MDB_val *val);
static void find_map_base(ckpt *c);

/* The payload of key, checked against its CRC; *p points into the map and is
 * valid until the transaction ends. */
static int get_value(ckpt *c, MDB_txn *txn, const char *k, const unsigned char **p, size_t *n,
                     err *e) {
    MDB_val key = {strlen(k), (void *)k}, val;
    int rc = mdb_get(txn, c->dbi, &key, &val);
    if (rc == MDB_NOTFOUND)
        return err_set(e, "checkpoint %s: value %s is missing; the checkpoint is damaged", c->dir,
                       k);
    if (rc) return err_set(e, "checkpoint %s: reading %s: %s", c->dir, k, mdb_strerror(rc));
    if (val.mv_size < 4)
        return err_set(e,
                       "checkpoint %s: value %s is %zu bytes, too short to hold its CRC; the "
                       "checkpoint is damaged",
                       c->dir, k, val.mv_size);
    if (value_in_file(c, &val) < 0)
        return err_set(e,
                       "checkpoint %s: value %s (%zu bytes) reaches past the end of data.mdb; "
                       "the file is truncated or damaged: restore the directory from a copy",
                       c->dir, k, val.mv_size);
    size_t len = val.mv_size - 4;
    uint32_t stored = get_u32((const unsigned char *)val.mv_data + len);
    uint32_t computed = value_crc(&key, val.mv_data, len);
    if (stored != computed)
        return err_set(e,
                       "value %s of checkpoint %s fails its CRC-32C check (stored %08x, computed "
                       "%08x): the file is damaged; read another step or restore the directory "
                       "from a copy",
                       k, c->dir, stored, computed);
    *p = val.mv_data;
    *n = len;
    return 0;
}

/* ---- transactions ---------------------------------------------------------- */

/* Begins a transaction, adopting a map another process has grown. A map
 * that keeps changing size is a damaged meta page (another process grows it
 * once per write), not a reason to loop forever. */
static int txn_begin(ckpt *c, unsigned flags, MDB_txn **txn, err *e) {
    for (int resized = 0;; resized++) {
        int rc = mdb_txn_begin(c->env, NULL, flags, txn);
        if (rc == MDB_MAP_RESIZED && resized < 8) {
            rc = mdb_env_set_mapsize(c->env, 0);
            find_map_base(c);
            if (!rc) continue;
        }
        if (rc == MDB_MAP_RESIZED)
            return err_set(e,
                           "checkpoint %s: its LMDB map size keeps changing under the reader; "
                           "data.mdb is damaged: restore the directory from a copy",
                           c->dir);
        if (rc)
            return err_set(e, "checkpoint %s: starting a transaction: %s", c->dir,
                           mdb_strerror(rc));
        return 0;
    }
}

static int parse_step(const MDB_val *key, uint64_t *step) {
    const char *k = key->mv_data;
    size_t plen = sizeof STEP_PREFIX - 1;
    if (key->mv_size <= STEP_PREFIX_LEN || memcmp(k, STEP_PREFIX, plen) ||
        k[STEP_PREFIX_LEN - 1] != '/')
        return -1;
    uint64_t s = 0;
    for (size_t i = plen; i < plen + STEP_DIGITS; i++) {
        if (k[i] < '0' || k[i] > '9') return -1;
        unsigned d = (unsigned)(k[i] - '0');
        if (s > (UINT64_MAX - d) / 10) return -1;
        s = s * 10 + d;
    }
    *step = s;
    return 0;
}

/* The distinct steps under "step/", ascending. Jumps over each step's keys
 * rather than visiting them: a checkpoint may hold many blobs. */
static int list_steps(ckpt *c, MDB_txn *txn, uint64_t **out, int *n, err *e) {
    *out = NULL;
    *n = 0;
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, c->dbi, &cur);
    if (rc) return err_set(e, "checkpoint %s: %s", c->dir, mdb_strerror(rc));
    uint64_t *steps = NULL;
    int count = 0, cap = 0;
    char seek[KEY_MAX] = STEP_PREFIX;
    MDB_val key = {strlen(seek), seek}, val;
    for (rc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE); !rc;
         rc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE)) {
        uint64_t s;
        if (key.mv_size < sizeof STEP_PREFIX - 1 ||
            memcmp(key.mv_data, STEP_PREFIX, sizeof STEP_PREFIX - 1))
            break;
        if (parse_step(&key, &s)) {
            int len = key.mv_size > 80 ? 80 : (int)key.mv_size;
            mdb_cursor_close(cur);
            free(steps);
            return err_set(e, "checkpoint %s: unexpected key '%.*s'; not written by peftps", c->dir,
                           len, (const char *)key.mv_data);
        }
        if (count == cap) {
            cap = cap ? 2 * cap : 16;
            uint64_t *grown = realloc(steps, (size_t)cap * sizeof *grown);
            if (!grown) {
                mdb_cursor_close(cur);
                free(steps);
                return err_set(e, "checkpoint %s: out of memory listing steps", c->dir);
            }
            steps = grown;
        }
        steps[count++] = s;
        /* "step/S0" sorts after every "step/S/..." and before the next step. */
        snprintf(seek, sizeof seek, STEP_PREFIX "%020" PRIu64 "0", s);
        key.mv_data = seek;
        key.mv_size = strlen(seek);
    }
    mdb_cursor_close(cur);
    if (rc && rc != MDB_NOTFOUND) {
        free(steps);
        return err_set(e, "checkpoint %s: listing steps: %s", c->dir, mdb_strerror(rc));
    }
    *out = steps;
    *n = count;
    return 0;
}

/* "10, 20, 30" (the last few when there are many), for messages. */
static void steps_text(const uint64_t *steps, int n, char *buf, size_t size) {
    size_t len = 0;
    buf[0] = '\0';
    int first = n > 8 ? n - 8 : 0;
    if (first) len += (size_t)snprintf(buf, size, "..., ");
    for (int i = first; i < n && len < size; i++)
        len +=
            (size_t)snprintf(buf + len, size - len, "%s%" PRIu64, i > first ? ", " : "", steps[i]);
}

/* Deletes every key of one step. Returns the LMDB code. */
static int delete_step(ckpt *c, MDB_txn *txn, uint64_t step) {
    char prefix[KEY_MAX];
    step_key(prefix, step, "");
    size_t plen = strlen(prefix);
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, c->dbi, &cur);
    if (rc) return rc;
    for (;;) {
        MDB_val key = {plen, prefix}, val;
        rc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE);
        if (rc == MDB_NOTFOUND) {
            rc = 0;
            break;
        }
        if (rc) break;
        if (key.mv_size < plen || memcmp(key.mv_data, prefix, plen)) break;
        rc = mdb_cursor_del(cur, 0);
        if (rc) break;
    }
    mdb_cursor_close(cur);
    return rc;
}

/* ---- open ------------------------------------------------------------------ */

/* 1 when dir holds anything but lock.mdb, 0 when not, -1 on error. */
static int dir_has_files(const char *dir, err *e) {
    DIR *d = opendir(dir);
    if (!d) return err_errno(e, "checkpoint directory %s", dir);
    int found = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") ||
            !strcmp(de->d_name, "lock.mdb"))
            continue;
        found = 1;
        break;
    }
    closedir(d);
    return found;
}

/* What exists at dir: checks the directory and data.mdb, creating the
 * directory when asked. *fresh is set when there is no data.mdb yet. */
static int check_dir(const char *dir, int create, int *fresh, err *e) {
    struct stat st;
    if (stat(dir, &st) < 0) {
        if (errno != ENOENT) return err_errno(e, "checkpoint directory %s", dir);
        if (!create) return err_set(e, "checkpoint directory %s does not exist", dir);
        if (fs_mkdir_p(dir, e) < 0) return err_wrap(e, "checkpoint");
    } else if (!S_ISDIR(st.st_mode)) {
        return err_set(e,
                       "checkpoint %s is not a directory (a checkpoint is an LMDB environment "
                       "directory holding data.mdb)",
                       dir);
    }
    size_t n = strlen(dir) + sizeof "/data.mdb";
    char *data = malloc(n);
    if (!data) return err_set(e, "out of memory");
    snprintf(data, n, "%s/data.mdb", dir);
    int rc = stat(data, &st);
    int saved = errno;
    if (rc == 0) {
        *fresh = 0;
        rc = ckpt_check_file(data, e);
        free(data);
        return rc;
    }
    free(data);
    errno = saved;
    if (errno != ENOENT) return err_errno(e, "checkpoint %s/data.mdb", dir);
    if (!create) return err_set(e, "%s holds no data.mdb: not a checkpoint directory", dir);
    int has = dir_has_files(dir, e);
    if (has < 0) return -1;
    if (has)
        return err_set(e,
                       "%s holds files but no data.mdb: not a checkpoint directory; point "
                       "checkpoint.path at a new or empty directory",
                       dir);
    *fresh = 1;
    return 0;
}

/* ---- the file against its meta pages ----------------------------------------
 * LMDB maps data.mdb and trusts it: a page its meta page names past the end
 * of a truncated file is a SIGBUS on first touch, and a zero-byte file is
 * taken as a new environment. So before LMDB sees the file, its two meta
 * pages are read here (layout of LMDB 0.9's MDB_page header and MDB_meta on
 * a 64-bit host) and the file must hold every page up to the last one the
 * newer meta says is in use. */

#define LMDB_MAGIC 0xBEEFC0DEu
#define LMDB_DATA_VERSION 1u
#define LMDB_P_META 0x08u
#define LMDB_PAGE_HEADER 16 /* pgno, pad, flags, lower/upper */
#define LMDB_META_PSIZE 24  /* mm_dbs[FREE_DBI].md_pad holds the page size */
#define LMDB_META_LAST_PG 120
#define LMDB_META_TXNID 128
#define LMDB_META_END 136

_Static_assert(sizeof(size_t) == 8, "the LMDB meta page layout read here is the 64-bit one");

/* One meta page at buf (n bytes available): 1 and its fields when it is one,
 * 0 when not. */
static int meta_parse(const unsigned char *buf, size_t n, uint32_t *psize, uint64_t *last_pg,
                      uint64_t *txnid) {
    if (n < LMDB_PAGE_HEADER + LMDB_META_END) return 0;
    uint16_t flags = (uint16_t)(buf[10] | buf[11] << 8);
    const unsigned char *m = buf + LMDB_PAGE_HEADER;
    if (!(flags & LMDB_P_META) || get_u32(m) != LMDB_MAGIC || get_u32(m + 4) != LMDB_DATA_VERSION)
        return 0;
    *psize = get_u32(m + LMDB_META_PSIZE);
    *last_pg = get_u64(m + LMDB_META_LAST_PG);
    *txnid = get_u64(m + LMDB_META_TXNID);
    return 1;
}

int ckpt_check_file(const char *path, err *e) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_errno(e, "checkpoint %s", path);
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int rc = err_errno(e, "checkpoint %s", path);
        close(fd);
        return rc;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size == 0) {
        close(fd);
        return err_set(e,
                       "checkpoint %s is empty (0 bytes): a first write was interrupted or the "
                       "file was truncated; it holds no checkpoint. Restore the directory from "
                       "a copy, or remove it to start from step 0",
                       path);
    }
    unsigned char page[LMDB_PAGE_HEADER + LMDB_META_END];
    uint32_t psize[2] = {0, 0};
    uint64_t last[2] = {0, 0}, txn[2] = {0, 0};
    int ok[2] = {0, 0};
    ssize_t got = pread(fd, page, sizeof page, 0);
    ok[0] = got > 0 && meta_parse(page, (size_t)got, &psize[0], &last[0], &txn[0]);
    /* The page size must be a power of two LMDB could have used. */
    if (ok[0] && (psize[0] < 512 || psize[0] > 65536 || (psize[0] & (psize[0] - 1)))) ok[0] = 0;
    if (ok[0]) {
        got = pread(fd, page, sizeof page, (off_t)psize[0]);
        ok[1] = got > 0 && meta_parse(page, (size_t)got, &psize[1], &last[1], &txn[1]) &&
                psize[1] == psize[0];
    }
    close(fd);
    if (!ok[0])
        return err_set(e,
                       "%s is not an LMDB file (%" PRIu64
                       " bytes, no LMDB meta page at its start): not a checkpoint; restore it "
                       "from a copy",
                       path, size);
    if (!ok[1]) {
        if (size < 2 * (uint64_t)psize[0])
            return err_set(e,
                           "checkpoint %s is truncated: %" PRIu64
                           " bytes, too short for LMDB's two meta pages (%u bytes); restore "
                           "the directory from a copy",
                           path, size, 2 * psize[0]);
        return err_set(e,
                       "checkpoint %s is damaged: its second LMDB meta page is not one; "
                       "restore the directory from a copy",
                       path);
    }
    /* LMDB reads the meta of the higher transaction id (the first on ties). */
    int cur = txn[1] > txn[0] ? 1 : 0;
    uint64_t need = last[cur] + 1;
    if (need > UINT64_MAX / psize[cur] || need * psize[cur] > size)
        return err_set(e,
                       "checkpoint %s is truncated: %" PRIu64 " bytes, but its LMDB meta page "
                       "(transaction %" PRIu64 ") says pages up to %" PRIu64 " are in use, %" PRIu64
                       " bytes; it was cut short (copy interrupted, disk full); restore the "
                       "directory from a copy",
                       path, size, txn[cur], last[cur],
                       need > UINT64_MAX / psize[cur] ? UINT64_MAX : need * psize[cur]);
    return 0;
}

static int open_error(const char *dir, const char *what, int rc, err *e) {
    if (rc == MDB_INVALID)
        return err_set(e, "%s/data.mdb is not an LMDB file: not a checkpoint directory", dir);
    if (rc == MDB_VERSION_MISMATCH)
        return err_set(e, "%s/data.mdb was written by an incompatible LMDB version", dir);
    if (rc == ENOENT) return err_set(e, "%s/data.mdb is empty: not a checkpoint", dir);
    return err_set(e, "checkpoint %s: %s: %s", dir, what, mdb_strerror(rc));
}

static int open_env(ckpt *c, int fresh, size_t map_size, err *e) {
    unsigned flags = c->rdonly ? MDB_RDONLY : 0;
    for (int attempt = 0;; attempt++) {
        int rc = mdb_env_create(&c->env);
        if (rc) return err_set(e, "checkpoint %s: %s", c->dir, mdb_strerror(rc));
        /* An existing environment keeps the map it grew to; 0 adopts it. */
        rc = mdb_env_set_mapsize(c->env, fresh ? map_size : 0);
        if (!rc) rc = mdb_env_open(c->env, c->dir, flags, 0664);
        if (!rc) break;
        mdb_env_close(c->env);
        c->env = NULL;
        /* A read-only mount or directory cannot hold lock.mdb; no writer can
         * work there either, so reading without the lock is safe. */
        if (c->rdonly && attempt == 0 && (rc == EROFS || rc == EACCES)) {
            flags |= MDB_NOLOCK;
            continue;
        }
        return open_error(c->dir, "opening the LMDB environment", rc, e);
    }
    if (!fresh && !c->rdonly && ckpt_map_size(c) < map_size) {
        int rc = mdb_env_set_mapsize(c->env, map_size);
        if (rc)
            return err_set(e, "checkpoint %s: setting the map size: %s", c->dir, mdb_strerror(rc));
    }
    return 0;
}

/* Checks the format key, writing it into an empty writable environment;
 * without create also requires a checkpoint. */
static int check_format(ckpt *c, err *e) {
    MDB_txn *txn;
    if (txn_begin(c, c->rdonly ? MDB_RDONLY : 0, &txn, e) < 0) return -1;
    int rc = mdb_dbi_open(txn, NULL, 0, &c->dbi);
    if (rc) {
        mdb_txn_abort(txn);
        return err_set(e, "checkpoint %s: opening the database: %s", c->dir, mdb_strerror(rc));
    }
    MDB_stat st;
    rc = mdb_stat(txn, c->dbi, &st);
    if (rc) {
        mdb_txn_abort(txn);
        return err_set(e, "checkpoint %s: %s", c->dir, mdb_strerror(rc));
    }
    if (st.ms_entries == 0) {
        if (c->rdonly) {
            mdb_txn_abort(txn);
            return err_set(e, "checkpoint %s holds no checkpoint", c->dir);
        }
        rc = put_value(txn, c->dbi, FORMAT_KEY, FORMAT_VALUE, sizeof FORMAT_VALUE - 1);
        if (!rc)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
        if (rc) return err_set(e, "checkpoint %s: initialising: %s", c->dir, mdb_strerror(rc));
        return 0;
    }
    const unsigned char *p;
    size_t n;
    MDB_val key = {sizeof FORMAT_KEY - 1, FORMAT_KEY}, val;
    if (mdb_get(txn, c->dbi, &key, &val) == MDB_NOTFOUND) {
        mdb_txn_abort(txn);
        return err_set(e,
                       "%s is an LMDB environment without the peftps checkpoint format key: not "
                       "a peftps checkpoint",
                       c->dir);
    }
    if (get_value(c, txn, FORMAT_KEY, &p, &n, e) < 0) {
        mdb_txn_abort(txn);
        return -1;
    }
    if (n != sizeof FORMAT_VALUE - 1 || memcmp(p, FORMAT_VALUE, n)) {
        int len = n > 64 ? 64 : (int)n;
        mdb_txn_abort(txn);
        return err_set(e, "checkpoint %s has format '%.*s'; this program reads '%s'", c->dir, len,
                       (const char *)p, FORMAT_VALUE);
    }
    if (c->rdonly) {
        uint64_t *steps;
        int count;
        if (list_steps(c, txn, &steps, &count, e) < 0) {
            mdb_txn_abort(txn);
            return -1;
        }
        free(steps);
        if (count == 0) {
            mdb_txn_abort(txn);
            return err_set(e, "checkpoint %s holds no checkpoint", c->dir);
        }
    }
    /* Committing keeps the database handle open beyond this transaction. */
    rc = mdb_txn_commit(txn);
    if (rc) return err_set(e, "checkpoint %s: %s", c->dir, mdb_strerror(rc));
    return 0;
}

int ckpt_open(ckpt **out, const char *dir, int create, const ckpt_options *opt, err *e) {
    *out = NULL;
    int fresh = 0;
    if (check_dir(dir, create, &fresh, e) < 0) return -1;
    ckpt *c = calloc(1, sizeof *c);
    if (!c || !(c->dir = strdup(dir))) {
        free(c);
        return err_set(e, "checkpoint %s: out of memory", dir);
    }
    c->rdonly = !create;
    c->keep = opt && opt->keep > 0 ? opt->keep : CKPT_DEFAULT_KEEP;
    size_t map_size = opt && opt->map_size ? opt->map_size : CKPT_DEFAULT_MAP_SIZE;
    if (open_env(c, fresh, map_size, e) < 0) {
        ckpt_close(c);
        return -1;
    }
    find_map_base(c);
    if (check_format(c, e) < 0) {
        ckpt_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

void ckpt_close(ckpt *c) {
    if (!c) return;
    if (c->env) mdb_env_close(c->env);
    free(c->dir);
    free(c);
}

/* 0 when val lies inside data.mdb as it is on disk: a value whose pages a
 * damaged tree places past the end would be a SIGBUS when read (one outside
 * the map is on a page a write transaction holds in memory). A writer's
 * file grows, so the size is looked up again before refusing. */
static int value_in_file(ckpt *c, const MDB_val *val) {
    MDB_envinfo info;
    if (!c->map_base || mdb_env_info(c->env, &info)) return 0;
    const char *base = c->map_base, *p = val->mv_data;
    /* A write transaction reads what it wrote from pages in memory. */
    if (p < base || (size_t)(p - base) >= info.me_mapsize) return 0;
    uint64_t end = (uint64_t)(p - base) + val->mv_size;
    if (end <= c->file_size) return 0;
    mdb_filehandle_t fd;
    struct stat st;
    if (mdb_env_get_fd(c->env, &fd) || fstat(fd, &st) < 0) return -1;
    c->file_size = (uint64_t)st.st_size;
    return end <= c->file_size ? 0 : -1;
}

/* Where LMDB mapped data.mdb (LMDB does not say): the mapping at offset 0
 * of its inode in /proc/self/maps; NULL when not found, and then values are
 * not bounded (value_in_file). */
static void find_map_base(ckpt *c) {
    mdb_filehandle_t fd;
    struct stat st;
    if (mdb_env_get_fd(c->env, &fd) || fstat(fd, &st) < 0) return;
    c->file_size = (uint64_t)st.st_size;
    FILE *f = fopen("/proc/self/maps", "r");
    c->map_base = NULL;
    if (!f) return;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        unsigned long long start, end, off, ino;
        unsigned maj, mnr;
        if (sscanf(line, "%llx-%llx %*s %llx %x:%x %llu", &start, &end, &off, &maj, &mnr, &ino) ==
                6 &&
            off == 0 && ino == (unsigned long long)st.st_ino && ino != 0) {
            c->map_base = (const char *)(uintptr_t)start;
            break;
        }
    }
    fclose(f);
}

const char *ckpt_dir(const ckpt *c) {
    return c->dir;
}

size_t ckpt_map_size(const ckpt *c) {
    MDB_envinfo info;
    if (mdb_env_info(c->env, &info)) return 0;
    return info.me_mapsize;
}

/* The header of one step; the write checks the latest against its own. */
static int read_meta(ckpt *c, MDB_txn *txn, uint64_t step, ckpt_info *m, err *e) {
    char key[KEY_MAX];
    step_key(key, step, "meta");
    const unsigned char *p;
    size_t n;
    if (get_value(c, txn, key, &p, &n, e) < 0) return -1;
    if (n != META_SIZE)
        return err_set(e, "checkpoint %s: value %s is %zu bytes, not %d", c->dir, key, n,
                       META_SIZE);
    uint32_t version = get_u32(p);
    if (version != META_VERSION)
        return err_set(e,
                       "checkpoint %s: step %" PRIu64 " has header version %u; this program "
                       "reads version %u",
                       c->dir, step, version, META_VERSION);
    memset(m, 0, sizeof *m);
    m->step = get_u64(p + 4);
    m->data_pos = get_u64(p + 12);
    m->opt_t = get_u64(p + 20);
    uint64_t n_params = get_u64(p + 28);
    uint32_t n_tensors = get_u32(p + 36), n_blobs = get_u32(p + 40);
    m->time = (int64_t)get_u64(p + 44);
    memcpy(m->experiment_fp, p + 52, 64);
    memcpy(m->base_fp, p + 116, 64);
    m->experiment_fp[64] = m->base_fp[64] = '\0';
    if (m->step != step)
        return err_set(e, "checkpoint %s: %s says step %" PRIu64 "; the checkpoint is damaged",
                       c->dir, key, m->step);
    if (n_params > SIZE_MAX / 4 - 8 || n_tensors > INT32_MAX || n_blobs > INT32_MAX)
        return err_set(e, "checkpoint %s: %s holds impossible counts; the checkpoint is damaged",
                       c->dir, key);
    m->n_params = (size_t)n_params;
    m->n_tensors = (int)n_tensors;
    m->n_blobs = (int)n_blobs;
    return 0;
}

/* ---- write ----------------------------------------------------------------- */

static int is_fingerprint(const char *s) {
    size_t i = 0;
    for (; s[i] && i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return i == 64 && s[64] == '\0';
}

/* Checks one tensor table entry against n_params; msg says what is wrong. */
static const char *tensor_problem(const peft_tensor *t, size_t n_params) {
    if (!memchr(t->name, '\0', sizeof t->name)) return "its name is not terminated";
    if (!t->name[0]) return "its name is empty";
    if (t->ndim < 0 || t->ndim > PEFT_MAX_DIMS) return "ndim is outside 0..4";
    size_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0) return "a dimension is negative";
        if (t->shape[d] && numel > SIZE_MAX / (size_t)t->shape[d]) return "its shape overflows";
        numel *= (size_t)t->shape[d];
    }
    if (numel != t->numel) return "numel is not the product of its shape";
    if (t->offset > n_params || t->numel > n_params - t->offset)
        return "it lies outside the parameter array";
    return NULL;
}

static int validate(const ckpt_data *d, err *e) {
    if (!is_fingerprint(d->experiment_fp))
        return err_set(e, "the experiment fingerprint '%.64s' is not 64 lower-case hex digits",
                       d->experiment_fp);
    if (d->base_fp[0] && !is_fingerprint(d->base_fp))
        return err_set(e, "the base fingerprint '%.64s' is neither empty nor 64 hex digits",
                       d->base_fp);
    if (d->n_params && (!d->params || !d->m || !d->v))
        return err_set(e, "params, m and v are required for %zu parameters", d->n_params);
    if (d->n_params > SIZE_MAX / 4 - 8)
        return err_set(e, "%zu parameters is too many", d->n_params);
    if (d->n_tensors < 0 || (d->n_tensors && !d->tensors) || d->n_blobs < 0 ||
        (d->n_blobs && !d->blobs))
        return err_set(e, "the tensor or blob list is invalid");
    for (int i = 0; i < d->n_tensors; i++) {
        const char *why = tensor_problem(&d->tensors[i], d->n_params);
        if (why)
            return err_set(e, "tensor %d ('%.*s'): %s", i, PEFT_NAME_MAX - 1, d->tensors[i].name,
                           why);
    }
    for (int i = 0; i < d->n_blobs; i++) {
        const ckpt_blob *b = &d->blobs[i];
        if (!memchr(b->name, '\0', sizeof b->name) || !b->name[0])
            return err_set(e, "blob %d: its name is empty or not terminated", i);
        if (b->size && !b->data)
            return err_set(e, "blob '%s': no data for %zu bytes", b->name, b->size);
        for (int j = 0; j < i; j++)
            if (!strcmp(d->blobs[j].name, b->name))
                return err_set(e, "blob '%s' is given twice", b->name);
    }
    return 0;
}

static size_t table_size(const peft_tensor *t, int n) {
    size_t size = 0;
    for (int i = 0; i < n; i++) size += 4 + strlen(t[i].name) + 4 + 8 * (size_t)t[i].ndim + 16;
    return size;
}

static void table_encode(const peft_tensor *t, int n, unsigned char *p) {
    for (int i = 0; i < n; i++) {
        size_t len = strlen(t[i].name);
        p = put_u32(p, (uint32_t)len);
        memcpy(p, t[i].name, len);
        p += len;
        p = put_u32(p, (uint32_t)t[i].ndim);
        for (int k = 0; k < t[i].ndim; k++) p = put_u64(p, (uint64_t)t[i].shape[k]);
        p = put_u64(p, t[i].offset);
        p = put_u64(p, t[i].numel);
    }
}

static void meta_encode(const ckpt_data *d, int64_t now, unsigned char *p) {
    p = put_u32(p, META_VERSION);
    p = put_u64(p, d->step);
    p = put_u64(p, d->data_pos);
    p = put_u64(p, d->opt_t);
    p = put_u64(p, d->n_params);
    p = put_u32(p, (uint32_t)d->n_tensors);
    p = put_u32(p, (uint32_t)d->n_blobs);
    p = put_u64(p, (uint64_t)now);
    memset(p, 0, 128);
    memcpy(p, d->experiment_fp, strlen(d->experiment_fp));
    memcpy(p + 64, d->base_fp, strlen(d->base_fp));
}

/* A failed write, told apart: a full disk (ENOSPC, or the EIO LMDB gives
 * for a short write when the file system has less room than the
 * checkpoint) is named as such, with the room left. */
static int write_error(ckpt *c, const char *what, const ckpt_data *d, int rc, err *e) {
    struct statvfs fs;
    uint64_t need = 3 * (uint64_t)d->n_params * sizeof(float);
    int measured = statvfs(c->dir, &fs) == 0;
    uint64_t avail = measured ? (uint64_t)fs.f_bavail * fs.f_frsize : 0;
    if (rc == ENOSPC || rc == EDQUOT || (rc == EIO && measured && avail < need))
        return err_set(e,
                       "checkpoint %s: %s step %" PRIu64 ": no space left on its file system "
                       "(%" PRIu64 " KiB free, the checkpoint needs about %" PRIu64
                       " KiB%s): free space there or point checkpoint.path at a larger disk; "
                       "the checkpoints written before are intact",
                       c->dir, what, d->step, avail / 1024, need / 1024,
                       rc == EDQUOT ? ", the disk quota is exhausted" : "");
    return err_set(e, "checkpoint %s: %s step %" PRIu64 ": %s", c->dir, what, d->step,
                   mdb_strerror(rc));
}

/* Puts every value of d and prunes. Returns 0, -1 with e set, or 1 when the
 * map is full (the transaction is then gone and nothing was written). */
static int write_once(ckpt *c, const ckpt_data *d, int64_t now, const unsigned char *table,
                      size_t table_n, err *e) {
    MDB_txn *txn;
    if (txn_begin(c, 0, &txn, e) < 0) return -1;
    uint64_t *steps = NULL;
    int n = 0;
    if (list_steps(c, txn, &steps, &n, e) < 0) goto fail;
    if (n && steps[n - 1] > d->step) {
        err_set(e,
                "checkpoint %s already holds step %" PRIu64 ", newer than step %" PRIu64
                " being written: continuing an older state there would mix two histories; "
                "remove the directory or use a new checkpoint.path",
                c->dir, steps[n - 1], d->step);
        goto fail;
    }
    if (n) {
        ckpt_info held;
        if (read_meta(c, txn, steps[n - 1], &held, e) < 0) goto fail;
        if (strcmp(held.experiment_fp, d->experiment_fp) ||
            (held.base_fp[0] && d->base_fp[0] && strcmp(held.base_fp, d->base_fp))) {
            err_set(e,
                    "checkpoint %s holds checkpoints of another experiment or base model "
                    "(fingerprint %.12s... vs %.12s...); use a new checkpoint.path or remove it",
                    c->dir,
                    strcmp(held.experiment_fp, d->experiment_fp) ? held.experiment_fp
                                                                 : held.base_fp,
                    strcmp(held.experiment_fp, d->experiment_fp) ? d->experiment_fp : d->base_fp);
            goto fail;
        }
    }
    free(steps);
    steps = NULL;

    int rc = delete_step(c, txn, d->step);
    unsigned char meta[META_SIZE];
    meta_encode(d, now, meta);
    char key[KEY_MAX];
    size_t bytes = d->n_params * sizeof(float);
    static const char *const fields[] = {"params", "m", "v"};
    const float *arrays[] = {d->params, d->m, d->v};
    if (!rc) {
        step_key(key, d->step, "meta");
        rc = put_value(txn, c->dbi, key, meta, sizeof meta);
    }
    if (!rc) {
        step_key(key, d->step, "tensors");
        rc = put_value(txn, c->dbi, key, table, table_n);
    }
    for (int i = 0; i < 3 && !rc; i++) {
        step_key(key, d->step, fields[i]);
        rc = put_value(txn, c->dbi, key, arrays[i], bytes);
    }
    for (int i = 0; i < d->n_blobs && !rc; i++) {
        char field[5 + CKPT_BLOB_NAME_MAX + 1];
        snprintf(field, sizeof field, "blob/%s", d->blobs[i].name);
        step_key(key, d->step, field);
        rc = put_value(txn, c->dbi, key, d->blobs[i].data, d->blobs[i].size);
    }
    if (!rc) {
        if (list_steps(c, txn, &steps, &n, e) < 0) goto fail;
        for (int i = 0; i + c->keep < n && !rc; i++) rc = delete_step(c, txn, steps[i]);
        free(steps);
        steps = NULL;
    }
    if (rc) {
        mdb_txn_abort(txn);
        if (rc == MDB_MAP_FULL) return 1;
        return write_error(c, "writing", d, rc, e);
    }
    rc = mdb_txn_commit(txn);
    if (rc == MDB_MAP_FULL) return 1;
    if (rc) return write_error(c, "committing", d, rc, e);
    return 0;
fail:
    free(steps);
    mdb_txn_abort(txn);
    return -1;
}

int ckpt_write(ckpt *c, const ckpt_data *d, err *e) {
    if (c->rdonly)
        return err_set(e, "checkpoint %s was opened read-only; cannot write step %" PRIu64, c->dir,
                       d->step);
    if (validate(d, e) < 0) return err_wrap(e, "checkpoint %s: step %" PRIu64, c->dir, d->step);
    size_t table_n = table_size(d->tensors, d->n_tensors);
    unsigned char *table = malloc(table_n ? table_n : 1);
    if (!table) return err_set(e, "checkpoint %s: out of memory", c->dir);
    table_encode(d->tensors, d->n_tensors, table);
    int64_t now = (int64_t)time(NULL);
    int rc;
    for (int growths = 0;; growths++) {
        rc = write_once(c, d, now, table, table_n, e);
        if (rc <= 0) break;
        size_t size = ckpt_map_size(c), next = size * 2;
        if (growths == MAX_GROWTHS || next <= size) {
            rc = err_set(e, "checkpoint %s: the map is full at %zu bytes and cannot grow further",
                         c->dir, size);
            break;
        }
        int mrc = mdb_env_set_mapsize(c->env, next);
        find_map_base(c);
        if (mrc) {
            rc = err_set(e, "checkpoint %s: growing the map to %zu bytes: %s", c->dir, next,
                         mdb_strerror(mrc));
            break;
        }
        log_debug("checkpoint %s: map full, grown to %zu bytes", c->dir, ckpt_map_size(c));
    }
    free(table);
    return rc;
}

/* ---- read ------------------------------------------------------------------ */

int ckpt_steps(ckpt *c, uint64_t **steps, int *n, err *e) {
    *steps = NULL;
    *n = 0;
    MDB_txn *txn;
    if (txn_begin(c, MDB_RDONLY, &txn, e) < 0) return -1;
    int rc = list_steps(c, txn, steps, n, e);
    mdb_txn_abort(txn);
    return rc;
}

static int read_table(ckpt *c, MDB_txn *txn, const ckpt_info *m, peft_tensor **out, err *e) {
    char key[KEY_MAX];
    step_key(key, m->step, "tensors");
    const unsigned char *p;
    size_t n;
    if (get_value(c, txn, key, &p, &n, e) < 0) return -1;
    /* Each entry takes at least 24 bytes, which bounds the allocation. */
    if ((size_t)m->n_tensors > n / 24 + 1)
        return err_set(e, "checkpoint %s: %s is too short for %d tensors", c->dir, key,
                       m->n_tensors);
    peft_tensor *t = calloc(m->n_tensors ? (size_t)m->n_tensors : 1, sizeof *t);
    if (!t) return err_set(e, "checkpoint %s: out of memory", c->dir);
    reader r = {p, p + n};
    for (int i = 0; i < m->n_tensors; i++) {
        uint32_t len, ndim;
        uint64_t x;
        const char *why = "it ends early";
        if (rd_u32(&r, &len)) goto bad;
        why = "a name is too long";
        if (len >= PEFT_NAME_MAX || (size_t)(r.end - r.p) < len) goto bad;
        memcpy(t[i].name, r.p, len);
        r.p += len;
        why = "it ends early";
        if (rd_u32(&r, &ndim)) goto bad;
        why = "a tensor has too many dimensions";
        if (ndim > PEFT_MAX_DIMS) goto bad;
        t[i].ndim = (int)ndim;
        why = "it ends early";
        for (uint32_t k = 0; k < ndim; k++) {
            if (rd_u64(&r, &x)) goto bad;
            t[i].shape[k] = (int64_t)x;
        }
        if (rd_u64(&r, &x)) goto bad;
        t[i].offset = (size_t)x;
        if (rd_u64(&r, &x)) goto bad;
        t[i].numel = (size_t)x;
        why = tensor_problem(&t[i], m->n_params);
        if (why) goto bad;
        continue;
    bad:
        free(t);
        return err_set(e, "checkpoint %s: %s is malformed at tensor %d: %s", c->dir, key, i, why);
    }
    if (r.p != r.end) {
        free(t);
        return err_set(e, "checkpoint %s: %s has %td bytes after its %d tensors", c->dir, key,
                       r.end - r.p, m->n_tensors);
    }
    *out = t;
    return 0;
}

static int read_array(ckpt *c, MDB_txn *txn, const ckpt_info *m, const char *field,
                      const float **out, err *e) {
    char key[KEY_MAX];
    step_key(key, m->step, field);
    const unsigned char *p;
    size_t n;
    if (get_value(c, txn, key, &p, &n, e) < 0) return -1;
    if (n != m->n_params * sizeof(float))
        return err_set(e, "checkpoint %s: %s is %zu bytes, not %zu floats", c->dir, key, n,
                       m->n_params);
    float *a = malloc(n ? n : 1);
    if (!a) return err_set(e, "checkpoint %s: out of memory for %s (%zu bytes)", c->dir, key, n);
    memcpy(a, p, n);
    *out = a;
    return 0;
}

static int read_blobs(ckpt *c, MDB_txn *txn, const ckpt_info *m, ckpt_blob **out, err *e) {
    char prefix[KEY_MAX];
    step_key(prefix, m->step, "blob/");
    size_t plen = strlen(prefix);
    ckpt_blob *b = calloc(m->n_blobs ? (size_t)m->n_blobs : 1, sizeof *b);
    if (!b) return err_set(e, "checkpoint %s: out of memory", c->dir);
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, c->dbi, &cur);
    if (rc) {
        free(b);
        return err_set(e, "checkpoint %s: %s", c->dir, mdb_strerror(rc));
    }
    int found = 0;
    MDB_val key = {plen, prefix}, val;
    for (rc = mdb_cursor_get(cur, &key, &val, MDB_SET_RANGE); !rc;
         rc = mdb_cursor_get(cur, &key, &val, MDB_NEXT)) {
        if (key.mv_size < plen || memcmp(key.mv_data, prefix, plen)) break;
        size_t len = key.mv_size - plen;
        if (found == m->n_blobs || len == 0 || len > CKPT_BLOB_NAME_MAX) {
            found = -1;
            break;
        }
        char k[KEY_MAX];
        memcpy(k, key.mv_data, key.mv_size);
        k[key.mv_size] = '\0';
        const unsigned char *p;
        size_t n;
        if (get_value(c, txn, k, &p, &n, e) < 0) goto fail;
        memcpy(b[found].name, k + plen, len);
        void *data = malloc(n ? n : 1);
        if (!data) {
            err_set(e, "checkpoint %s: out of memory for %s", c->dir, k);
            goto fail;
        }
        memcpy(data, p, n);
        b[found].data = data;
        b[found].size = n;
        found++;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    if (rc && rc != MDB_NOTFOUND) {
        err_set(e, "checkpoint %s: reading blobs: %s", c->dir, mdb_strerror(rc));
        goto fail;
    }
    if (found != m->n_blobs) {
        err_set(e, "checkpoint %s: step %" PRIu64 " should hold %d blobs but holds %s", c->dir,
                m->step, m->n_blobs, found < 0 ? "more or a malformed one" : "fewer");
        goto fail;
    }
    *out = b;
    return 0;
fail:
    if (cur) mdb_cursor_close(cur);
    for (int i = 0; i < m->n_blobs; i++) free((void *)b[i].data);
    free(b);
    return -1;
}

/* Resolves CKPT_LATEST and checks that the step is held. */
static int resolve_step(ckpt *c, MDB_txn *txn, uint64_t *step, err *e) {
    uint64_t *steps;
    int n;
    if (list_steps(c, txn, &steps, &n, e) < 0) return -1;
    int found = 0;
    for (int i = 0; i < n; i++) found |= steps[i] == *step;
    if (n && *step == CKPT_LATEST) {
        *step = steps[n - 1];
        found = 1;
    }
    if (!found) {
        char held[256];
        steps_text(steps, n, held, sizeof held);
        if (n)
            err_set(e, "checkpoint %s has no step %" PRIu64 " (steps held: %s)", c->dir, *step,
                    held);
        else
            err_set(e, "checkpoint %s holds no checkpoint", c->dir);
    }
    free(steps);
    return found ? 0 : -1;
}

int ckpt_read(ckpt *c, uint64_t step, ckpt_data *out, err *e) {
    memset(out, 0, sizeof *out);
    MDB_txn *txn;
    if (txn_begin(c, MDB_RDONLY, &txn, e) < 0) return -1;
    ckpt_info m;
    peft_tensor *tensors = NULL;
    ckpt_blob *blobs = NULL;
    if (resolve_step(c, txn, &step, e) < 0 || read_meta(c, txn, step, &m, e) < 0) goto fail;
    out->step = m.step;
    memcpy(out->experiment_fp, m.experiment_fp, sizeof m.experiment_fp);
    memcpy(out->base_fp, m.base_fp, sizeof m.base_fp);
    out->data_pos = m.data_pos;
    out->opt_t = m.opt_t;
    out->n_params = m.n_params;
    out->time = m.time;
    if (read_table(c, txn, &m, &tensors, e) < 0) goto fail;
    out->tensors = tensors;
    out->n_tensors = m.n_tensors;
    if (read_array(c, txn, &m, "params", &out->params, e) < 0 ||
        read_array(c, txn, &m, "m", &out->m, e) < 0 ||
        read_array(c, txn, &m, "v", &out->v, e) < 0 || read_blobs(c, txn, &m, &blobs, e) < 0)
        goto fail;
    out->blobs = blobs;
    out->n_blobs = m.n_blobs;
    mdb_txn_abort(txn);
    return 0;
fail:
    mdb_txn_abort(txn);
    ckpt_data_free(out);
    return -1;
}

int ckpt_list(ckpt *c, ckpt_info **out, int *n, err *e) {
    *out = NULL;
    *n = 0;
    MDB_txn *txn;
    if (txn_begin(c, MDB_RDONLY, &txn, e) < 0) return -1;
    uint64_t *steps;
    int count;
    if (list_steps(c, txn, &steps, &count, e) < 0) {
        mdb_txn_abort(txn);
        return -1;
    }
    ckpt_info *info = calloc(count ? (size_t)count : 1, sizeof *info);
    if (!info) {
        err_set(e, "checkpoint %s: out of memory", c->dir);
        goto fail;
    }
    for (int i = 0; i < count; i++)
        if (read_meta(c, txn, steps[i], &info[i], e) < 0) goto fail;
    mdb_txn_abort(txn);
    free(steps);
    *out = count ? info : NULL;
    if (!count) free(info);
    *n = count;
    return 0;
fail:
    mdb_txn_abort(txn);
    free(steps);
    free(info);
    return -1;
}

void ckpt_data_free(ckpt_data *d) {
    if (!d) return;
    free((void *)d->params);
    free((void *)d->m);
    free((void *)d->v);
    free((void *)d->tensors);
    for (int i = 0; i < d->n_blobs; i++) free((void *)d->blobs[i].data);
    free((void *)d->blobs);
    memset(d, 0, sizeof *d);
}

/* ---- check ----------------------------------------------------------------- */

static void shape_text(const peft_tensor *t, char *buf, size_t size) {
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int k = 0; k < t->ndim && len < size; k++)
        len += (size_t)snprintf(buf + len, size - len, "%s%" PRId64, k ? ", " : "", t->shape[k]);
    if (len < size) snprintf(buf + len, size - len, "]");
}

int ckpt_check(const ckpt_data *d, const char *dir, const char *expected_experiment_fp,
               const char *expected_base_fp, const peft_tensor *tensors, int n, size_t n_params,
               err *e) {
    if (strcmp(d->experiment_fp, expected_experiment_fp))
        return err_set(e,
                       "checkpoint %s was written by another experiment (fingerprint %.12s... vs "
                       "%.12s... of this one); use a new checkpoint.path or remove it",
                       dir, d->experiment_fp, expected_experiment_fp);
    if (expected_base_fp && d->base_fp[0] && strcmp(d->base_fp, expected_base_fp))
        return err_set(e,
                       "checkpoint %s was trained on another base model (fingerprint %.12s... vs "
                       "%.12s... of model.path); point model.path at the original model or use a "
                       "new checkpoint.path",
                       dir, d->base_fp, expected_base_fp);
    const char *fix = "the experiment matches but its trainable tensors do not; was the program "
                      "changed? use a new checkpoint.path or remove it";
    if (d->n_tensors != n)
        return err_set(e, "checkpoint %s holds %d tensors, the method declares %d: %s", dir,
                       d->n_tensors, n, fix);
    for (int i = 0; i < n; i++) {
        const peft_tensor *a = &d->tensors[i], *b = &tensors[i];
        int same = !strcmp(a->name, b->name) && a->ndim == b->ndim && a->offset == b->offset &&
                   a->numel == b->numel;
        for (int k = 0; same && k < a->ndim; k++) same = a->shape[k] == b->shape[k];
        if (!same) {
            char sa[96], sb[96];
            shape_text(a, sa, sizeof sa);
            shape_text(b, sb, sizeof sb);
            return err_set(e,
                           "checkpoint %s: tensor %d is %s %s at offset %zu, the method declares "
                           "%s %s at offset %zu: %s",
                           dir, i, a->name, sa, a->offset, b->name, sb, b->offset, fix);
        }
    }
    if (d->n_params != n_params)
        return err_set(e, "checkpoint %s holds %zu parameters, the method %zu: %s", dir,
                       d->n_params, n_params, fix);
    return 0;
}
