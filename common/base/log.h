/* Log lines on stderr with a timestamp, the program name and a level.
 * PEFTPS_LOG=debug|info|warn|error sets the threshold (default info).
 * Repeated lines are rate-limited: of the lines of one kind (the same text
 * once numbers and hex identities are set aside) only the first
 * LOG_REPEAT_BURST of each LOG_REPEAT_WINDOW_S seconds are written; the
 * rest are counted and summed up in one line ("... N more in the last 10 s
 * like: <the last of them>") when the window ends. Thread-safe. */
#ifndef PEFTPS_LOG_H
#define PEFTPS_LOG_H

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

#define LOG_REPEAT_WINDOW_S 10.0
#define LOG_REPEAT_BURST 5

/* Names the program in every line ("server", "worker", ...). */
void log_init(const char *program);

/* Writes one line if level passes the threshold and its kind has not
 * filled its window (then counts it). */
void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Like log_msg, but every line of this format is one kind whatever its
 * arguments (for arguments that are not numbers, such as Z85 keys). */
void log_msg_format_kind(log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Writes the summaries of windows that have ended; called by event loops,
 * so that a flood that stopped is still summed up. */
void log_flush(void);

/* Sets the rate-limit window (tests); 0 restores LOG_REPEAT_WINDOW_S. */
void log_set_repeat_window(double seconds);

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
