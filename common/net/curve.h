/* CURVE security between workers and parameter servers: key files in Z85
 * (written by `peftps keygen`, cli/cmd_keygen.c), the socket options of
 * both ends, and the ZAP handler with which a server (server/) admits only
 * the workers whose public keys are listed. The worker (worker/) uses the
 * client side.
 *
 * Files. A key pair file (OUT.key, secret) holds the lines
 *     public-key: <40 Z85 characters>
 *     secret-key: <40 Z85 characters>
 * and a public key file (OUT.pub) one line with the public key alone; an
 * authorized-keys file holds one public key per line. Everywhere, blank
 * lines and lines starting with '#' are ignored. */
#ifndef PEFTPS_CURVE_H
#define PEFTPS_CURVE_H

#include "base/err.h"

#define CURVE_KEY_Z85 40 /* characters of a Z85 key */

typedef struct curve_keys {
    char public_key[CURVE_KEY_Z85 + 1];
    char secret_key[CURVE_KEY_Z85 + 1]; /* "" when the file held none */
} curve_keys;

/* Creates a new key pair and writes PREFIX.key (mode 0600) and PREFIX.pub.
 * Fails, naming the file, when a file cannot be written or already exists
 * (keys are never overwritten), or when libzmq was built without CURVE. */
int curve_keygen(const char *prefix, err *e);

/* Reads a key file: a pair file, or (need_secret 0 only) a public key file.
 * Fails, naming the file and line, when it cannot be read, a key is not 40
 * Z85 characters that decode, a line is neither a key nor a comment, the
 * public key is missing, or need_secret is set and the secret key is
 * missing or does not belong to the public key. */
int curve_keys_load(curve_keys *k, const char *path, int need_secret, err *e);

/* Overwrites the secret with zeros. */
void curve_keys_wipe(curve_keys *k);

/* Makes sock (before bind) a CURVE server with k's secret key, in the ZAP
 * domain "peftps" with the domain enforced, so that every peer passes the
 * ZAP handler of curve_zap_start. */
int curve_server_setup(void *sock, const curve_keys *k, err *e);

/* Makes sock (before connect) a CURVE client with its own pair `mine` and
 * the server's public key. */
int curve_client_setup(void *sock, const curve_keys *mine, const char *server_public, err *e);

/* Starts the ZAP handler of ctx (inproc://zeromq.zap.01) in a thread: it
 * accepts CURVE peers whose public key is listed in authorized_path or
 * equals also_public (the servers' own key, with which servers link to each
 * other; may be NULL) and refuses everything else (other mechanisms,
 * unlisted keys), logging each refusal. Call before any socket of ctx binds. *handle is for
 * curve_zap_stop. Fails when the file cannot be read or holds a bad line, or
 * ZeroMQ or the thread cannot start. */
int curve_zap_start(void **handle, void *ctx, const char *authorized_path, const char *also_public,
                    err *e);

/* Has the handler read authorized_path again before its next answer (within
 * a tenth of a second): the new list replaces the old when the whole file
 * reads well; otherwise the error is logged and the old list stays. */
void curve_zap_reload(void *handle);

/* Stops and joins the handler (within a few hundred ms); before the context
 * is terminated. */
void curve_zap_stop(void *handle);

#endif
