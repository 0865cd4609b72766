/* Log lines on stderr with a timestamp, the program name and a level.
 * PEFTPS_LOG=debug|info|warn|error sets the threshold (default info). */
#ifndef PEFTPS_LOG_H
#define PEFTPS_LOG_H

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

/* Names the program in every line ("server", "worker", ...). */
void log_init(const char *program);

/* Writes one line if level passes the threshold. */
void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
