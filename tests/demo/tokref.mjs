// Encodes lines of text with the Hugging Face reference tokenizer
// (@huggingface/tokenizers, installed by `make test` into build/cache/npm) to
// show that the bundled examples/base-model/tokenizer.json is read by Hugging
// Face's own code the way common/data/tokenizer.c reads it (tests/it_demo.sh).
//
//   node tests/demo/tokref.mjs NPM_PREFIX MODEL_DIR < lines   prints the ids of
//   each line, BOS included, space-separated, one line per input line
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { createRequire } from "node:module";

const [prefix, dir] = process.argv.slice(2);
if (!prefix || !dir) {
    console.error("usage: node tokref.mjs NPM_PREFIX MODEL_DIR < lines");
    process.exit(2);
}
const require = createRequire(resolve(prefix, "node_modules", "x.js"));
const { Tokenizer } = require("@huggingface/tokenizers");
const json = JSON.parse(readFileSync(join(dir, "tokenizer.json"), "utf8"));
const config = JSON.parse(readFileSync(join(dir, "tokenizer_config.json"), "utf8"));
const tok = new Tokenizer(json, config);
const lines = readFileSync(0, "utf8").split("\n");
if (lines[lines.length - 1] === "") lines.pop();
for (const line of lines) console.log(tok.encode(line, { add_special_tokens: true }).ids.join(" "));
