/* CURVE key files, socket options and the ZAP handler thread; see curve.h.
 * The handler speaks ZAP 1.0 (ZeroMQ RFC 27) over a REP socket on the
 * server's own context. */
#include "net/curve.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

#include "base/log.h"

/* A stable option of libzmq 4.3 that Debian's headers list as draft. */
#ifndef ZMQ_ZAP_ENFORCE_DOMAIN
#define ZMQ_ZAP_ENFORCE_DOMAIN 93
#endif

#define CURVE_ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define CURVE_DOMAIN "peftps"
/* How often the handler looks at its stop flag. */
#define CURVE_ZAP_POLL_MS 100

/* ---- key files ---------------------------------------------------------------------- */

/* 40 Z85 characters that decode to 32 bytes. */
static int key_valid(const char *k) {
    if (strlen(k) != CURVE_KEY_Z85) return 0;
    uint8_t raw[32];
    return zmq_z85_decode(raw, k) != NULL;
}

/* Strips a line of its end and leading blanks; returns NULL for blank and
 * comment lines. */
static char *line_content(char *line) {
    line[strcspn(line, "\r\n")] = '\0';
    while (*line == ' ' || *line == '\t') line++;
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == ' ' || line[n - 1] == '\t')) line[--n] = '\0';
    return *line && *line != '#' ? line : NULL;
}

static int write_new(const char *path, const char *text, mode_t mode, err *e) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode);
    if (fd < 0) {
        if (errno == EEXIST)
            return err_set(e, "%s exists already; keys are never overwritten", path);
        return err_errno(e, "creating %s", path);
    }
    size_t n = strlen(text);
    ssize_t w = write(fd, text, n);
    if (w != (ssize_t)n) {
        err_errno(e, "writing %s", path);
        close(fd);
        return -1;
    }
    if (close(fd) < 0) return err_errno(e, "writing %s", path);
    return 0;
}

int curve_keygen(const char *prefix, err *e) {
    if (!zmq_has("curve")) return err_set(e, "this libzmq was built without CURVE support");
    char pub[CURVE_KEY_Z85 + 1], sec[CURVE_KEY_Z85 + 1];
    if (zmq_curve_keypair(pub, sec) < 0)
        return err_set(e, "zmq_curve_keypair: %s", zmq_strerror(errno));
    char kpath[4096], ppath[4096], text[512];
    if (snprintf(kpath, sizeof kpath, "%s.key", prefix) >= (int)sizeof kpath ||
        snprintf(ppath, sizeof ppath, "%s.pub", prefix) >= (int)sizeof ppath)
        return err_set(e, "%s: path too long", prefix);
    snprintf(text, sizeof text,
             "# peftps CURVE key pair (Z85). Keep this file secret.\n"
             "public-key: %s\nsecret-key: %s\n",
             pub, sec);
    int rc = write_new(kpath, text, 0600, e);
    memset(text, 0, sizeof text);
    memset(sec, 0, sizeof sec);
    if (rc < 0) return -1;
    snprintf(text, sizeof text, "%s\n", pub);
    if (write_new(ppath, text, 0644, e) < 0) {
        unlink(kpath);
        return -1;
    }
    return 0;
}

int curve_keys_load(curve_keys *k, const char *path, int need_secret, err *e) {
    memset(k, 0, sizeof *k);
    FILE *f = fopen(path, "r");
    if (!f) return err_errno(e, "%s", path);
    char buf[512];
    int lineno = 0, rc = -1;
    while (fgets(buf, sizeof buf, f)) {
        lineno++;
        char *l = line_content(buf);
        if (!l) continue;
        char *dst = k->public_key;
        if (!strncmp(l, "public-key:", 11)) {
            l += 11;
        } else if (!strncmp(l, "secret-key:", 11)) {
            l += 11;
            dst = k->secret_key;
        }
        while (*l == ' ' || *l == '\t') l++;
        if (!key_valid(l)) {
            err_set(e,
                    "%s:%d: not a Z85 CURVE key (40 characters) nor a 'public-key:' or "
                    "'secret-key:' line",
                    path, lineno);
            goto done;
        }
        memcpy(dst, l, CURVE_KEY_Z85 + 1);
    }
    if (ferror(f)) {
        err_errno(e, "reading %s", path);
        goto done;
    }
    if (!k->public_key[0]) {
        err_set(e, "%s holds no public key", path);
        goto done;
    }
    if (need_secret) {
        char derived[CURVE_KEY_Z85 + 1];
        if (!k->secret_key[0]) {
            err_set(e, "%s holds no secret key (give the .key file of `peftps keygen`, not .pub)",
                    path);
            goto done;
        }
        if (zmq_curve_public(derived, k->secret_key) < 0 || strcmp(derived, k->public_key)) {
            err_set(e, "%s: the secret key does not belong to the public key", path);
            goto done;
        }
    }
    rc = 0;
done:
    fclose(f);
    memset(buf, 0, sizeof buf);
    if (rc < 0) curve_keys_wipe(k);
    return rc;
}

void curve_keys_wipe(curve_keys *k) {
    volatile char *p = k->secret_key;
    for (size_t i = 0; i < sizeof k->secret_key; i++) p[i] = 0;
}

static int setopt(void *sock, int opt, const void *v, size_t n, const char *what, err *e) {
    if (zmq_setsockopt(sock, opt, v, n) < 0)
        return err_set(e, "setting %s: %s", what, zmq_strerror(errno));
    return 0;
}

int curve_server_setup(void *sock, const curve_keys *k, err *e) {
    int one = 1;
    if (setopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one, "ZMQ_CURVE_SERVER", e) < 0 ||
        setopt(sock, ZMQ_CURVE_SECRETKEY, k->secret_key, CURVE_KEY_Z85 + 1, "ZMQ_CURVE_SECRETKEY",
               e) < 0 ||
        setopt(sock, ZMQ_ZAP_DOMAIN, CURVE_DOMAIN, strlen(CURVE_DOMAIN), "ZMQ_ZAP_DOMAIN", e) < 0)
        return -1;
    /* Without it libzmq 4.3 would admit peers when no handler answered. */
    if (zmq_setsockopt(sock, ZMQ_ZAP_ENFORCE_DOMAIN, &one, sizeof one) < 0)
        log_warn("ZMQ_ZAP_ENFORCE_DOMAIN unsupported by this libzmq (%s); relying on the ZAP "
                 "handler being present",
                 zmq_strerror(errno));
    return 0;
}

int curve_client_setup(void *sock, const curve_keys *mine, const char *server_public, err *e) {
    if (setopt(sock, ZMQ_CURVE_SERVERKEY, server_public, CURVE_KEY_Z85 + 1, "ZMQ_CURVE_SERVERKEY",
               e) < 0 ||
        setopt(sock, ZMQ_CURVE_PUBLICKEY, mine->public_key, CURVE_KEY_Z85 + 1,
               "ZMQ_CURVE_PUBLICKEY", e) < 0 ||
        setopt(sock, ZMQ_CURVE_SECRETKEY, mine->secret_key, CURVE_KEY_Z85 + 1,
               "ZMQ_CURVE_SECRETKEY", e) < 0)
        return -1;
    return 0;
}

/* ---- ZAP handler -------------------------------------------------------------------- */

typedef struct zap {
    void *sock;
    pthread_t thread;
    atomic_int stop, reload;
    char *path;       /* the authorized-keys file */
    uint8_t self[32]; /* also accepted: the servers' own key */
    int has_self;
    uint8_t (*keys)[32]; /* authorized public keys, raw, then self */
    int n_keys;
} zap;

/* Reads the authorized-keys file into a new list, with the servers' own key
 * after its keys; z's list is left alone on failure. */
static int authorized_load(const zap *z, uint8_t (**out)[32], int *n_out, err *e) {
    const char *path = z->path;
    FILE *f = fopen(path, "r");
    if (!f) return err_errno(e, "%s", path);
    char buf[512];
    int lineno = 0, cap = 0, n = 0, rc = -1;
    uint8_t(*keys)[32] = NULL;
    while (fgets(buf, sizeof buf, f)) {
        lineno++;
        char *l = line_content(buf);
        if (!l) continue;
        if (!strncmp(l, "public-key:", 11))
            for (l += 11; *l == ' ' || *l == '\t';) l++;
        if (!key_valid(l)) {
            err_set(e, "%s:%d: not a Z85 CURVE public key (40 characters)", path, lineno);
            goto done;
        }
        if (n + 1 >= cap) { /* room for self too */
            cap = cap ? cap * 2 : 16;
            void *nk = realloc(keys, (size_t)cap * sizeof *keys);
            if (!nk) {
                err_set(e, "out of memory");
                goto done;
            }
            keys = nk;
        }
        zmq_z85_decode(keys[n++], l);
    }
    if (ferror(f)) {
        err_errno(e, "reading %s", path);
        goto done;
    }
    if (n == 0) log_warn("%s lists no key: every worker will be refused", path);
    if (z->has_self) {
        void *nk = realloc(keys, (size_t)(n + 1) * sizeof *keys);
        if (!nk) {
            err_set(e, "out of memory");
            goto done;
        }
        keys = nk;
        memcpy(keys[n++], z->self, 32);
    }
    *out = keys;
    *n_out = n;
    keys = NULL;
    rc = 0;
done:
    free(keys);
    fclose(f);
    return rc;
}

/* In the handler's thread, between requests: the new list replaces the old
 * one only when the whole file reads well. */
static void zap_reload(zap *z) {
    uint8_t(*keys)[32];
    int n;
    err e;
    if (authorized_load(z, &keys, &n, &e) < 0) {
        log_error("reloading the authorized keys: %s; the %d keys read before stay", e.msg,
                  z->n_keys - z->has_self);
        return;
    }
    free(z->keys);
    z->keys = keys;
    z->n_keys = n;
    log_info("reloaded %s: %d authorized keys", z->path, n - z->has_self);
}

static int zap_send(void *sock, const void *p, size_t n, int more) {
    return zmq_send(sock, p, n, more ? ZMQ_SNDMORE : 0) < 0 ? -1 : 0;
}

/* One request: frames version, request id, domain, address, identity,
 * mechanism, then credentials (for CURVE the client's 32-byte key). */
static void zap_answer(zap *z) {
    zmq_msg_t part[8];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, z->sock, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (n < 8)
            part[n++] = m;
        else
            zmq_msg_close(&m);
    }
    if (n < 2) {
        for (int i = 0; i < n; i++) zmq_msg_close(&part[i]);
        return; /* nothing to answer: REP resets on the next request */
    }
    const char *status = "400", *text = "unknown key";
    if (n < 6 || zmq_msg_size(&part[0]) != 3 || memcmp(zmq_msg_data(&part[0]), "1.0", 3)) {
        status = "500";
        text = "bad ZAP request";
    } else if (zmq_msg_size(&part[5]) != 5 || memcmp(zmq_msg_data(&part[5]), "CURVE", 5)) {
        text = "CURVE required";
    } else if (n >= 7 && zmq_msg_size(&part[6]) == 32) {
        for (int i = 0; i < z->n_keys; i++)
            if (!memcmp(z->keys[i], zmq_msg_data(&part[6]), 32)) {
                status = "200";
                text = "OK";
                break;
            }
    }
    if (strcmp(status, "200")) {
        char addr[64] = "?", key[CURVE_KEY_Z85 + 1] = "?";
        if (n >= 4) {
            size_t an =
                zmq_msg_size(&part[3]) < sizeof addr - 1 ? zmq_msg_size(&part[3]) : sizeof addr - 1;
            memcpy(addr, zmq_msg_data(&part[3]), an);
            addr[an] = '\0';
        }
        if (n >= 7 && zmq_msg_size(&part[6]) == 32) zmq_z85_encode(key, zmq_msg_data(&part[6]), 32);
        log_msg_format_kind(LOG_WARN, "refused a connection from %s (key %s): %s", addr, key, text);
    }
    zap_send(z->sock, "1.0", 3, 1);
    zap_send(z->sock, zmq_msg_data(&part[1]), zmq_msg_size(&part[1]), 1);
    zap_send(z->sock, status, 3, 1);
    zap_send(z->sock, text, strlen(text), 1);
    zap_send(z->sock, "", 0, 1);
    zap_send(z->sock, "", 0, 0);
    for (int i = 0; i < n; i++) zmq_msg_close(&part[i]);
}

static void *zap_main(void *arg) {
    zap *z = arg;
    while (!atomic_load(&z->stop)) {
        if (atomic_exchange(&z->reload, 0)) zap_reload(z);
        zmq_pollitem_t it = {z->sock, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&it, 1, CURVE_ZAP_POLL_MS);
        if (rc < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (rc > 0) zap_answer(z);
    }
    return NULL;
}

int curve_zap_start(void **handle, void *ctx, const char *authorized_path, const char *also_public,
                    err *e) {
    *handle = NULL;
    zap *z = calloc(1, sizeof *z);
    if (!z) return err_set(e, "out of memory");
    z->path = strdup(authorized_path);
    if (!z->path) {
        err_set(e, "out of memory");
        goto fail;
    }
    if (also_public && key_valid(also_public)) {
        zmq_z85_decode(z->self, also_public);
        z->has_self = 1;
    }
    if (authorized_load(z, &z->keys, &z->n_keys, e) < 0) goto fail;
    z->sock = zmq_socket(ctx, ZMQ_REP);
    if (!z->sock) {
        err_set(e, "ZAP socket: %s", zmq_strerror(errno));
        goto fail;
    }
    int linger = 0;
    zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(z->sock, CURVE_ZAP_ENDPOINT) < 0) {
        err_set(e, "binding %s: %s", CURVE_ZAP_ENDPOINT, zmq_strerror(errno));
        goto fail;
    }
    if (pthread_create(&z->thread, NULL, zap_main, z) != 0) {
        err_set(e, "starting the ZAP handler thread failed");
        goto fail;
    }
    *handle = z;
    return 0;
fail:
    if (z->sock) zmq_close(z->sock);
    free(z->keys);
    free(z->path);
    free(z);
    return -1;
}

void curve_zap_reload(void *handle) {
    zap *z = handle;
    if (z) atomic_store(&z->reload, 1);
}

void curve_zap_stop(void *handle) {
    zap *z = handle;
    if (!z) return;
    atomic_store(&z->stop, 1);
    pthread_join(z->thread, NULL);
    zmq_close(z->sock);
    free(z->keys);
    free(z->path);
    free(z);
}
