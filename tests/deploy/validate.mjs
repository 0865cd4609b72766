// Offline checks of deploy/ for tests/it_deploy.sh, run with the npm packages
// of package.json (installed by the test under build/cache/npm/deploy):
//
//   node validate.mjs k8s RENDERED.yaml...   every object against the
//       Kubernetes API schema (kubernetes-models' validators: types, enums,
//       required fields), then a strict check of field names: each object is
//       written as a TypeScript literal of its kubernetes-models interface and
//       compiled, so that an unknown field at any depth is an error (the
//       compiler's excess-property check) and so is a value of the wrong type.
//   node validate.mjs dockerfile Dockerfile  the Dockerfile's syntax and
//       instructions (dockerfile-utils, the parser behind editors' Dockerfile
//       support) plus the rules deploy/Dockerfile promises: stages from
//       Debian bookworm, apt lists removed, no recommends, a non-root user.
//
// Prints one line per problem and exits 1 if there was any, 0 otherwise.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const problems = [];
const problem = (where, what) => problems.push(`${where}: ${what}`);

// ---- Kubernetes objects -----------------------------------------------------------

// "apps/v1" -> "apps/v1", "v1" -> "v1": kubernetes-models' folders follow the
// apiVersion; the core group has no group prefix.
function modelPath(apiVersion, kind) {
  return `kubernetes-models/${apiVersion}/${kind}`;
}

async function checkK8s(files) {
  const YAML = (await import("yaml")).default;
  const objects = [];
  for (const file of files) {
    const docs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8"));
    for (const doc of docs) {
      if (doc.errors.length) {
        for (const e of doc.errors) problem(file, `YAML: ${e.message}`);
        continue;
      }
      const obj = doc.toJS();
      if (obj === null) continue;
      // kustomize folds long base64 values of Secrets into lines; the API
      // server's decoder skips line breaks, the "byte" format does not.
      if (obj.kind === "Secret" && obj.data)
        for (const k of Object.keys(obj.data)) obj.data[k] = String(obj.data[k]).replace(/\n/g, "");
      objects.push({ file, obj });
    }
  }
  if (objects.length === 0) problem(files.join(" "), "no Kubernetes object found");

  // 1. The schema validators.
  const imports = [];
  const literals = [];
  for (const [i, { file, obj }] of objects.entries()) {
    const name = `${obj.kind} ${obj.metadata?.namespace ?? ""}/${obj.metadata?.name ?? "?"}`;
    const where = `${file}: ${name}`;
    if (typeof obj.apiVersion !== "string" || typeof obj.kind !== "string") {
      problem(where, "no apiVersion or kind");
      continue;
    }
    let mod;
    try {
      mod = await import(modelPath(obj.apiVersion, obj.kind));
    } catch {
      problem(where, `no schema for apiVersion ${obj.apiVersion} kind ${obj.kind}`);
      continue;
    }
    const Model = mod[obj.kind];
    try {
      new Model(obj).validate();
    } catch (e) {
      const details = (e.errors ?? [])
        .map((x) => `${x.instancePath || "/"} ${x.message}`)
        .join("; ");
      problem(where, `schema: ${details || e.message}`);
    }
    imports.push(`import type { I${obj.kind} as T${i} } from "${modelPath(obj.apiVersion, obj.kind)}";`);
    literals.push({ i, where, text: `export const o${i}: T${i} = ${JSON.stringify(obj, null, 2)};` });
  }

  // 2. Field names and types, through the TypeScript compiler.
  const ts = (await import("typescript")).default;
  const src = path.join(here, "strict-check.ts");
  let text = imports.join("\n") + "\n";
  const ranges = [];
  for (const l of literals) {
    const first = text.split("\n").length;
    text += l.text + "\n";
    ranges.push({ first, last: text.split("\n").length - 1, where: l.where });
  }
  fs.writeFileSync(src, text);
  const program = ts.createProgram([src], {
    noEmit: true,
    strict: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    types: [],
  });
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const msg = ts.flattenDiagnosticMessageText(d.messageText, " ");
    if (!d.file || d.file.fileName !== src) {
      problem("typescript", msg);
      continue;
    }
    const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
    const r = ranges.find((x) => line + 1 >= x.first && line + 1 <= x.last);
    const code = text.split("\n")[line].trim();
    problem(r ? r.where : `strict-check.ts:${line + 1}`, `field check: ${msg} (at ${code})`);
  }
  if (problems.length === 0) console.log(`${objects.length} objects valid, no unknown field`);
}

// ---- the Dockerfile ---------------------------------------------------------------

async function checkDockerfile(file) {
  const utils = (await import("dockerfile-utils")).default;
  const ast = (await import("dockerfile-ast")).default;
  const content = fs.readFileSync(file, "utf8");
  for (const d of utils.validate(content)) {
    problem(`${file}:${d.range.start.line + 1}`, `dockerfile-utils: ${d.message}`);
  }
  const df = ast.DockerfileParser.parse(content);
  const froms = df.getFROMs();
  if (froms.length < 2) problem(file, "not a multi-stage build (fewer than two FROM)");
  for (const f of froms) {
    const image = f.getImage();
    if (!/^debian:bookworm(-slim)?$/.test(image ?? ""))
      problem(`${file}:${f.getRange().start.line + 1}`, `stage from '${image}', not debian:bookworm`);
  }
  for (const ins of df.getInstructions()) {
    if (ins.getKeyword() !== "RUN") continue;
    const line = `${file}:${ins.getRange().start.line + 1}`;
    const cmd = ins.getArgumentsContent() ?? "";
    if (/apt-get\s+install/.test(cmd)) {
      if (!/--no-install-recommends/.test(cmd)) problem(line, "apt-get install without --no-install-recommends");
      if (!/-y\b/.test(cmd)) problem(line, "apt-get install without -y");
    }
    if (/apt-get\s+update/.test(cmd) && !/rm -rf \/var\/lib\/apt\/lists/.test(cmd))
      problem(line, "apt-get update without removing /var/lib/apt/lists in the same layer");
  }
  // The last stage's last USER decides who runs the programs.
  const last = froms[froms.length - 1];
  const users = df
    .getInstructions()
    .filter((i) => i.getKeyword() === "USER" && i.getRange().start.line > last.getRange().start.line);
  const user = users.length ? users[users.length - 1].getArgumentsContent().split(":")[0] : "root";
  if (user === "root" || user === "0") problem(file, "the image runs as root (no USER in the last stage)");
  if (problems.length === 0) console.log(`${file}: ${df.getInstructions().length} instructions, clean`);
}

// ---- main ---------------------------------------------------------------------------

const [mode, ...files] = process.argv.slice(2);
if (mode === "k8s" && files.length) await checkK8s(files);
else if (mode === "dockerfile" && files.length === 1) await checkDockerfile(files[0]);
else {
  console.error("usage: node validate.mjs k8s FILE.yaml... | dockerfile FILE");
  process.exit(2);
}
for (const p of problems) console.log(p);
process.exit(problems.length ? 1 : 0);
