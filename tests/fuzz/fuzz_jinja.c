/* libFuzzer target for common/data/jinja.c and common/data/chat.c: any bytes
 * are a chat template (they come from model files). What parses is rendered
 * over a fixed conversation with and without the generation prompt, and its
 * assistant turns are located; errors are fine, crashes, leaks and
 * unbounded work are not. Seeds: the published templates in
 * tests/reference/chat/templates (tests/fuzz/corpus/fuzz_jinja). */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>

#include "data/chat.h"
#include "data/jinja.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static json_t *messages;
    if (!messages)
        messages =
            json_loads("[{\"role\": \"system\", \"content\": \"Be brief.\"},"
                       " {\"role\": \"user\", \"content\": \"Hi  \"},"
                       " {\"role\": \"assistant\", \"content\": \"Hello!\"},"
                       " {\"role\": \"user\", \"content\": \"Bye\"},"
                       " {\"role\": \"assistant\", \"content\": \" See you \", \"train\": false}]",
                       0, NULL);
    chat *c;
    err e;
    if (chat_from_string(&c, (const char *)data, size, "<s>", "</s>", &e)) return 0;
    for (int gen = 0; gen < 2; gen++) {
        char *text = NULL;
        size_t len;
        if (!chat_render(c, messages, gen, &text, &len, &e)) free(text);
    }
    char *text;
    size_t len, *spans, n;
    if (!chat_spans(c, messages, &text, &len, &spans, &n, &e)) {
        for (size_t i = 0; i < n; i++)
            if (spans[2 * i] > spans[2 * i + 1] || spans[2 * i + 1] > len) abort();
        free(text);
        free(spans);
    }
    chat_free(c);
    return 0;
}
