# peftps build. `make` builds the three programs; `make test` and `make demo`
# first install any missing Debian packages (see `make deps`), so each works as
# the first command typed on a fresh machine. Everything built lands in build/
# (objects, generated protobuf-c code, tests) and bin/ (the programs).

CC       ?= cc
PREFIX   ?= /usr/local
DESTDIR  ?=
BUILD    ?= build
BIN      ?= bin
OPT      ?= -O2
SAN      ?=

# Debian packages needed to build and test, one per library, plus tools.
DEB_PKGS := gcc make pkg-config libc6-dev \
            libzmq3-dev libprotobuf-c-dev protobuf-c-compiler \
            libopenblas-dev liblmdb-dev libcmocka-dev libjansson-dev libpcre2-dev \
            libutf8proc-dev libmicrohttpd-dev libsodium-dev yamllint iproute2 python3 wordnet-base bible-kjv
PKGS     := libzmq libprotobuf-c openblas lmdb jansson libpcre2-8 libutf8proc libmicrohttpd libsodium

# Recursively expanded on purpose: pkg-config is only asked when a recipe
# runs, after `deps` has had the chance to install it.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS))
PKG_LIBS   = $(shell pkg-config --libs $(PKGS))
CMOCKA_LIBS = $(shell pkg-config --libs cmocka)

WARN     := -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter
CFLAGS   += -std=c11 -D_GNU_SOURCE $(OPT) -g $(WARN) $(SAN) -fno-strict-aliasing
CPPFLAGS += -I. -Icommon -I$(BUILD)/proto
LDLIBS    = $(PKG_LIBS) -lm -lpthread

PROTOS   := $(wildcard proto/*.proto)
PROTO_C  := $(patsubst proto/%.proto,$(BUILD)/proto/%.pb-c.c,$(PROTOS))
PROTO_H  := $(PROTO_C:.c=.h)
PROTO_O  := $(PROTO_C:.c=.o)

# common/ is split into rooms by floor (base, config, model, methods, data,
# train, net); every room's sources go into one library.
COMMON_SRC := $(wildcard common/*/*.c)
COMMON_O   := $(patsubst %.c,$(BUILD)/%.o,$(COMMON_SRC)) $(PROTO_O)
LIB        := $(BUILD)/libpeftps.a

CLI_O     := $(patsubst %.c,$(BUILD)/%.o,$(wildcard cli/*.c))
SERVER_O  := $(patsubst %.c,$(BUILD)/%.o,$(wildcard server/*.c))
WORKER_O  := $(patsubst %.c,$(BUILD)/%.o,$(wildcard worker/*.c))
PROGRAMS  := $(BIN)/peftps $(BIN)/peftps-server $(BIN)/peftps-worker

TEST_SRC  := $(wildcard tests/test_*.c)
TESTS     := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))
# Programs the tests run that are not tests themselves (the chaos test's rogue,
# the pool test's stand-in peer).
TEST_TOOLS := $(BUILD)/tests/chaos_rogue $(BUILD)/tests/pool_peer
FUZZ_SRC  := $(wildcard tests/fuzz/fuzz_*.c)
FUZZERS   := $(patsubst tests/fuzz/%.c,$(BUILD)/fuzz/%,$(FUZZ_SRC))

.PHONY: all deps test check chaos demo asan test-asan fuzz fuzz-build fuzz-run bench bench-sizes bench-pool bench-onednn install \
        uninstall clean format
.SUFFIXES:
.SECONDARY:

all: $(PROGRAMS)

# ---- generated code --------------------------------------------------------
$(BUILD)/proto/%.pb-c.c $(BUILD)/proto/%.pb-c.h: proto/%.proto
	@mkdir -p $(@D)
	protoc-c --c_out=$(BUILD)/proto -Iproto $<

$(BUILD)/proto/%.pb-c.o: $(BUILD)/proto/%.pb-c.c
	$(CC) $(CFLAGS) $(CPPFLAGS) $(PKG_CFLAGS) -c $< -o $@

# ---- objects ---------------------------------------------------------------
# Every object waits for the generated headers; -MMD tracks the rest.
$(BUILD)/%.o: %.c | $(PROTO_H)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(CPPFLAGS) $(PKG_CFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(COMMON_O)
	@rm -f $@
	ar rcs $@ $^

$(BIN)/peftps: $(CLI_O) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BIN)/peftps-server: $(SERVER_O) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BIN)/peftps-worker: $(WORKER_O) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(LIB)
	$(CC) $(CFLAGS) $(LDFLAGS) $^ -o $@ $(LDLIBS) $(CMOCKA_LIBS)

# The plotter is the front end's (cli/), not the library's.
$(BUILD)/tests/test_svgplot: $(BUILD)/tests/test_svgplot.o $(BUILD)/cli/svgplot.o $(LIB)
	$(CC) $(CFLAGS) $(LDFLAGS) $^ -o $@ $(LDLIBS) $(CMOCKA_LIBS)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# ---- setup -----------------------------------------------------------------
# Installs only what is missing; prints nothing and touches nothing when all
# packages are present.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# ---- tests -----------------------------------------------------------------
test: deps
	@$(MAKE) --no-print-directory check

# demo-data: the demo experiments name data derived from Debian packages,
# which config checks in the tests expect to exist.
check: $(PROGRAMS) $(TESTS) $(TEST_TOOLS) demo-data
	@BUILD=$(BUILD) BIN=$(BIN) sh tests/run.sh

# The standing chaos test: a seeded 200-step run under 20 worker SIGKILLs,
# 3 server SIGKILLs with resume, and a rogue peer pushing NaN and huge
# values, compared bit for bit with `peftps train`. CHAOS_SEED replays one
# (default: a new seed, printed); `make test` runs a short form (it_chaos).
CHAOS_SEED ?=
chaos: deps
	@$(MAKE) --no-print-directory $(PROGRAMS) $(TEST_TOOLS)
	@BUILD=$(BUILD) BIN=$(BIN) sh tests/chaos.sh $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

asan:
	@$(MAKE) --no-print-directory BUILD=build/asan BIN=build/asan/bin OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" all

test-asan: deps
	@$(MAKE) --no-print-directory BUILD=build/asan BIN=build/asan/bin OPT=-O1 \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" check

# libFuzzer targets, built with clang against the library's sources.
FUZZ_CFLAGS = -std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=fuzzer,address,undefined \
              -fno-sanitize-recover=all $(CPPFLAGS) -Ibuild/fuzz/proto $(PKG_CFLAGS)
fuzz: deps
	@$(MAKE) --no-print-directory BUILD=build/fuzz fuzz-build

fuzz-build: $(FUZZERS)

$(BUILD)/fuzz/%: tests/fuzz/%.c $(COMMON_SRC) $(PROTO_C)
	@mkdir -p $(@D)
	clang $(FUZZ_CFLAGS) $^ -o $@ $(LDLIBS)

# Runs every fuzz target for FUZZ_SECONDS each (default 60).
FUZZ_SECONDS ?= 60
fuzz-run: fuzz
	@for f in build/fuzz/fuzz/fuzz_*; do \
	  name=$$(basename $$f); mkdir -p build/fuzz/corpus/$$name; \
	  echo "fuzzing $$name for $(FUZZ_SECONDS)s"; \
	  $$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	      build/fuzz/corpus/$$name tests/fuzz/corpus/$$name || exit 1; \
	done

# ---- benchmarks ------------------------------------------------------------
# Training tokens/s against PyTorch (Debian's python3-torch), interleaved
# (tests/bench/run.py; BENCH_ARGS="--reps 3 --shapes small" narrows it), then
# bytes moved per step and step time through the parameter server, LoRA
# against full fine-tuning (tests/bench/cluster.py).
BENCH_ARGS ?=
bench: deps
	@dpkg-query -W -f='$${Status}' python3-torch 2>/dev/null | grep -q "install ok installed" || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get install -y -qq --no-install-recommends python3-torch; }
	@$(MAKE) --no-print-directory $(BUILD)/bench/bench_train
	/usr/bin/python3 tests/bench/run.py --out $(BUILD)/bench/table.md $(BENCH_ARGS)
	@$(MAKE) --no-print-directory all
	/usr/bin/python3 tests/bench/cluster.py --out $(BUILD)/bench/cluster.md

# One pool of workers serving many experiments (tests/bench/pool.py): four
# LoRA experiments one after another against concurrently on a 2-worker
# pool, with and without co-batching; a pool worker's memory with N
# experiments; the demo methods with `peftps compare --pool`.
POOL_ARGS ?=
bench-pool: all
	@$(MAKE) --no-print-directory demo-data
	/usr/bin/python3 tests/bench/pool.py --out $(BUILD)/bench/pool.md $(POOL_ARGS)

# What each real model shape costs here (tests/bench/sizes.py): random BF16
# models of the published configs (tests/bench/make_models.py, numpy), LoRA
# r=16 on all seven projections, seq 512, batch 1, recomputation on, one
# server and one worker; SIZES_ARGS="Llama-3.2-1B --steps 3" narrows it.
SIZES_ARGS ?=
bench-sizes: all
	@dpkg-query -W -f='$${Status}' python3-numpy 2>/dev/null | grep -q "install ok installed" || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get install -y -qq --no-install-recommends python3-numpy; }
	/usr/bin/python3 tests/bench/sizes.py --work $(BUILD)/bench/sizes --out $(BUILD)/bench/sizes.md $(SIZES_ARGS)

# peftps's BF16 products against oneDNN's BF16 matmul on the bench models'
# projection shapes, in one process (tests/bench/bench_onednn.c; Debian's
# libdnnl-dev, installed here if missing, is linked by this benchmark only),
# then the ceiling of both: vdpbf16ps alone on the team.
bench-onednn: deps
	@dpkg-query -W -f='$${Status}' libdnnl-dev 2>/dev/null | grep -q "install ok installed" || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get install -y -qq --no-install-recommends libdnnl-dev; }
	@$(MAKE) --no-print-directory $(BUILD)/bench/bench_onednn $(BUILD)/bench/bench_train
	$(BUILD)/bench/bench_onednn
	$(BUILD)/bench/bench_train --bf16-peak

$(BUILD)/bench/bench_onednn: LDLIBS += -ldnnl

$(BUILD)/bench/%: $(BUILD)/tests/bench/%.o $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) $^ -o $@ $(LDLIBS)

# ---- demo: the bundled base model, the main job, the comparison -------------
# (This block belongs to the demo.) Scripts are in tests/demo/, experiments in
# examples/demo-*.pbtxt, the bundled model in examples/base-model/. The text
# they train on is derived at run time from Debian packages of DEB_PKGS
# (wordnet-base, bible-kjv): no third-party text is committed.
METHOD       ?= lora
DEMO_DIR     ?= build/demo
DEMO_METHODS := lora lora-bf16 prefix layer_wise attention_heads subnetwork full
DEMO_ENV      = BIN=$(BIN) WORK=$(DEMO_DIR)
.PHONY: base-model compare demo-data

# `make demo [METHOD=lora|prefix|layer_wise|attention_heads|subnetwork|full]`:
# fine-tunes the bundled base on a local cluster (1 server, 2 workers),
# evaluates before and after, exports, prints samples and a summary.
demo: deps
	@$(MAKE) --no-print-directory -j2 all demo-data
	@$(DEMO_ENV) sh tests/demo/demo.sh $(METHOD)

# Every method on the same task, steps and batch: the table, and
# $(DEMO_DIR)/compare/loss.svg with the loss curves.
compare: deps
	@$(MAKE) --no-print-directory -j2 all demo-data
	OPENBLAS_NUM_THREADS=1 $(BIN)/peftps compare $(DEMO_METHODS:%=examples/demo-%.pbtxt) \
	  --workers 2 --out $(DEMO_DIR)/compare

# Rebuilds examples/base-model/ from nothing: data, tokenizer, random init,
# pretraining through the parameter server (about half an hour on 2 cores).
base-model: deps
	@$(MAKE) --no-print-directory -j2 all
	@$(DEMO_ENV) sh tests/demo/base_model.sh examples/base-model

# What the demo experiments name, in seconds: the KJV and WordNet data, and
# the random initial weights that examples/demo-pretrain.pbtxt starts from.
demo-data: $(DEMO_DIR)/kjv-train.jsonl $(DEMO_DIR)/wordnet-train.jsonl \
           $(DEMO_DIR)/pos-train.jsonl $(DEMO_DIR)/wordnet-chat-train.jsonl \
           $(DEMO_DIR)/init/model.safetensors

$(DEMO_DIR)/kjv-train.jsonl: tests/demo/kjv.py
	@mkdir -p $(@D)
	/usr/bin/python3 tests/demo/kjv.py $@ $(DEMO_DIR)/kjv-eval.jsonl

$(DEMO_DIR)/wordnet-train.jsonl: tests/demo/wordnet.py
	@mkdir -p $(@D)
	/usr/bin/python3 tests/demo/wordnet.py $@ $(DEMO_DIR)/wordnet-eval.jsonl

# examples/classify-pos.pbtxt: the part of speech of WordNet entries.
$(DEMO_DIR)/pos-train.jsonl: tests/demo/wordnet_pos.py tests/demo/wordnet.py
	@mkdir -p $(@D)
	/usr/bin/python3 tests/demo/wordnet_pos.py $@ $(DEMO_DIR)/pos-eval.jsonl

$(DEMO_DIR)/wordnet-chat-train.jsonl: tests/demo/wordnet.py
	@mkdir -p $(@D)
	/usr/bin/python3 tests/demo/wordnet.py $@ $(DEMO_DIR)/wordnet-chat-eval.jsonl --chat 4000

$(DEMO_DIR)/init/model.safetensors: tests/demo/init_model.py examples/base-model/tokenizer.json
	/usr/bin/python3 tests/demo/init_model.py $(@D) --tokenizer examples/base-model --seed 1
# ---- end of the demo block ---------------------------------------------------

# ---- install ---------------------------------------------------------------
install: all
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(PROGRAMS) $(DESTDIR)$(PREFIX)/bin/

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,peftps peftps-server peftps-worker)

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf build bin
