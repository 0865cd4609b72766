/* `peftps export SOURCE --format peft|merged|tensors --out PATH`: what a run
 * trained, as a Hugging Face PEFT adapter, a merged model directory or a
 * safetensors file of raw tensors, over common/train/export.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "train/ckpt.h"
#include "cli.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "train/export.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "model/safetensors.h"

static const char usage[] =
    "usage: peftps export SOURCE --format peft|merged|tensors --out PATH [options]\n\n"
    "SOURCE is what holds the trained tensors: the output directory of `peftps train`\n"
    "or `peftps run` (tensors.safetensors + experiment.pbtxt), a checkpoint directory\n"
    "(checkpoint.path of the experiment), a PEFT adapter directory, or a safetensors\n"
    "file of trained tensors.\n\n"
    "formats:\n"
    "  peft      PATH/adapter_config.json + PATH/adapter_model.safetensors, as Hugging\n"
    "            Face PEFT saves an adapter (LoRA and prefix tuning only): load it with\n"
    "            PeftModel.from_pretrained(base, PATH), or convert a LoRA for llama.cpp\n"
    "  merged    a complete model directory PATH (config.json, model.safetensors,\n"
    "            tokenizer files): the base with the trained change added, in the\n"
    "            base's dtype (see --dtype; every method but prefix tuning, which\n"
    "            changes no weight)\n"
    "  tensors   one safetensors file PATH of the trained tensors, by name (needs\n"
    "            neither the base nor the experiment); the default when --out ends\n"
    "            in .safetensors\n\n"
    "options:\n"
    "  --experiment FILE  the experiment that trained SOURCE (default:\n"
    "                     SOURCE/experiment.pbtxt; required for a checkpoint or a file)\n"
    "  --set PATH=VALUE   override a field of that experiment, as for the run (repeatable)\n"
    "  --model DIR        the base model directory (default: the experiment's model.path,\n"
    "                     or a PEFT adapter's base_model_name_or_path)\n"
    "  --step N           the checkpoint step to export (default: the newest)\n"
    "  --shard-size SIZE  merged: largest weights file, in bytes or with KB, MB, GB\n"
    "                     (default 4GB); larger models are written in shards with\n"
    "                     model.safetensors.index.json\n"
    "  --dtype bf16|f32   merged: the weights' dtype (default: the base's, BF16 for a\n"
    "                     BF16 base, else F32); the sum is taken in F32, then rounded\n"
    "                     to nearest even for BF16 (an 8B model: 16 GB, not 32)\n"
    "  -h, --help         this help\n";

/* "4GB", "500MB", "65536": bytes, powers of 1000 as Hugging Face counts them. */
static int parse_size(const char *s, size_t *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || !(v > 0)) return -1;
    double mult = 1;
    if (!strcasecmp(end, "KB"))
        mult = 1e3;
    else if (!strcasecmp(end, "MB"))
        mult = 1e6;
    else if (!strcasecmp(end, "GB"))
        mult = 1e9;
    else if (*end)
        return -1;
    if (v * mult > 1e18) return -1;
    *out = (size_t)(v * mult);
    return *out ? 0 : -1;
}

/* Writes SOURCE to out in the format asked for. */
static int export_write(const char *source, const char *format, const export_opts *o,
                        const char *out, size_t shard, int dtype, export_kind kind, err *e) {
    if (!strcmp(format, "tensors")) {
        if (export_tensors(source, o, out, e) < 0) return -1;
        log_info("wrote %s", out);
        return 0;
    }
    export_source *s;
    if (export_open(&s, source, o, e) < 0) return -1;
    if (kind == EXPORT_CHECKPOINT)
        log_info("%s: checkpoint of step %llu", source, (unsigned long long)s->step);
    int rc =
        !strcmp(format, "peft") ? export_peft(s, out, e) : export_merged(s, out, shard, dtype, e);
    if (rc == 0)
        log_info("wrote %s (%s, method %s over %s)", out, format, s->p->method->name,
                 s->exp->model->path);
    export_close(s);
    return rc;
}

int cmd_export(int argc, char **argv) {
    config_args sets;
    err e;
    if (config_parse_args(&argc, argv, &sets, &e) < 0) {
        fprintf(stderr, "peftps export: %s\n%s", e.msg, usage);
        return 2;
    }
    const char *source = NULL, *format = NULL, *out = NULL, *shard_text = NULL, *dtype_text = NULL;
    export_opts o;
    export_opts_default(&o);
    o.sets = sets.sets;
    o.nsets = sets.nsets;
    const cmdline_opt opts[] = {CMDLINE_STR("--format", &format),
                                CMDLINE_STR("--out", &out),
                                CMDLINE_STR("--experiment", &o.experiment),
                                CMDLINE_STR("--model", &o.model_dir),
                                CMDLINE_UINT("--step", &o.step, 0, CMDLINE_UINT_MAX),
                                CMDLINE_STR("--shard-size", &shard_text),
                                CMDLINE_STR("--dtype", &dtype_text)};
    int rc = cmdline_parse("peftps export", usage, opts, 7, "source", &source, 1, argc, argv);
    if (rc) {
        rc = rc == 1 ? 0 : 2;
        goto done;
    }
    rc = 2;
    if (!source || !out) {
        fprintf(stderr, "peftps export: %s\n%s", !source ? "no SOURCE given" : "--out is required",
                usage);
        goto done;
    }
    if (!format && fs_ends_with(out, ".safetensors")) format = "tensors";
    if (!format ||
        (strcmp(format, "peft") && strcmp(format, "merged") && strcmp(format, "tensors"))) {
        fprintf(stderr, "peftps export: --format must be peft, merged or tensors%s%s%s\n%s",
                format ? " (not '" : "", format ? format : "", format ? "')" : "", usage);
        goto done;
    }
    size_t shard = 0;
    if (shard_text && parse_size(shard_text, &shard) < 0) {
        fprintf(stderr, "peftps export: --shard-size '%s' is not a size (e.g. 4GB, 500MB)\n",
                shard_text);
        goto done;
    }
    int dtype = EXPORT_DTYPE_BASE;
    if (dtype_text) {
        if (!strcasecmp(dtype_text, "bf16") || !strcasecmp(dtype_text, "bfloat16"))
            dtype = ST_BF16;
        else if (!strcasecmp(dtype_text, "f32") || !strcasecmp(dtype_text, "float32"))
            dtype = ST_F32;
        else {
            fprintf(stderr, "peftps export: --dtype must be bf16 or f32 (not '%s')\n%s", dtype_text,
                    usage);
            goto done;
        }
        if (strcmp(format, "merged")) {
            fprintf(stderr, "peftps export: --dtype applies to --format merged only\n");
            goto done;
        }
    }
    export_kind kind;
    if (export_kind_of(source, &kind, &e) < 0) {
        fprintf(stderr, "peftps export: %s\n", e.msg);
        goto done;
    }

    rc = 1;
    if (export_write(source, format, &o, out, shard, dtype, kind, &e) < 0)
        fprintf(stderr, "peftps export: %s\n", e.msg);
    else
        rc = 0;
done:
    config_args_free(&sets);
    return rc;
}
