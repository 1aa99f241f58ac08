# Hearth. `make run` sets up this machine and serves; `make test` runs every test.
# Both install what they need (Debian packages, the guest image) idempotently, as root.

export CARGO_TARGET_DIR ?= /var/cache/hearth/target
CARGO ?= cargo
HEARTH_DEBUG := $(CARGO_TARGET_DIR)/debug/hearth
HEARTH_RELEASE := $(CARGO_TARGET_DIR)/release/hearth
PG_URL := postgres://hearth:hearth@127.0.0.1:5432/hearth

.PHONY: run setup test fuzz fuzz-mail build image bench clean-containers ui lint

## Install Docker and mmdebstrap, start dockerd, build Hearth and the guest image, then serve.
run: setup
	$(HEARTH_RELEASE) serve

setup:
	scripts/services.sh docker
	$(MAKE) ui
	$(CARGO) build --release --bin hearth
	$(HEARTH_RELEASE) image build

## Every test, on SQLite and PostgreSQL, against the real Docker engine; then the fuzzer.
test:
	scripts/services.sh docker postgres redis fuzz qemu ui mail git
	$(MAKE) ui
	$(HEARTH_DEBUG) image build
	$(HEARTH_DEBUG) image build --vm
	$(MAKE) clean-containers
	HEARTH_TEST_POSTGRES_URL=$(PG_URL) $(CARGO) nextest run --workspace --no-fail-fast; \
	  status=$$?; python3 scripts/fuzz.py $(HEARTH_DEBUG) --examples 10 || status=1; \
	  $(MAKE) fuzz-mail FUZZ_SECONDS=45 || status=1; \
	  $(MAKE) clean-containers; exit $$status

## The web UI into ui/dist (embedded by the next cargo build): its API types are generated
## from the OpenAPI document of `hearth openapi`; npm ci runs only when package-lock.json changed.
ui:
	scripts/services.sh ui
	$(CARGO) build --bin hearth
	$(HEARTH_DEBUG) openapi > ui/openapi.json
	cd ui && { [ node_modules/.hearth-installed -nt package-lock.json ] || { npm ci --no-audit --no-fund && touch node_modules/.hearth-installed; }; } && npm run build

## Schemathesis against /openapi.json with a user's and an admin's token.
fuzz:
	scripts/services.sh fuzz
	$(CARGO) build --bin hearth
	python3 scripts/fuzz.py $(HEARTH_DEBUG) --examples 25

## cargo fuzz on everything the mail parser reads (stable Rust: no sanitizer, so it finds
## panics and hangs, not memory errors, which safe Rust rules out). New inputs it finds are
## kept in /var/cache/hearth/fuzz-corpus; a crash lands in fuzz/artifacts and fails.
FUZZ_SECONDS ?= 300
fuzz-mail:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked --version 0.13.2
	mkdir -p /var/cache/hearth/fuzz-corpus/mail
	@echo "cargo fuzz: the mail parser for $(FUZZ_SECONDS) s (its log: /tmp/hearth-fuzz-mail.log)"
	@cd fuzz && $(CARGO) fuzz run mail --sanitizer none --target-dir /var/cache/hearth/fuzz-target \
	  /var/cache/hearth/fuzz-corpus/mail seeds/mail -- -max_total_time=$(FUZZ_SECONDS) -timeout=5 -print_final_stats=1 \
	  >/tmp/hearth-fuzz-mail.log 2>&1 || { tail -60 /tmp/hearth-fuzz-mail.log; exit 1; }
	@grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' /tmp/hearth-fuzz-mail.log

## Benchmarks of BENCHMARKS.md (needs the same setup as the tests).
bench:
	scripts/services.sh docker
	$(CARGO) build --release --bin hearth
	$(HEARTH_RELEASE) image build
	python3 scripts/bench.py $(HEARTH_RELEASE)

## Formatting and clippy's default lints, as errors (kept clean; not part of `make test`, whose
## time goes to behaviour).
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Remove containers that Hearth's tests left behind (their hearth.instance label starts
## with test-; a real installation's VMs are never touched).
clean-containers:
	@ids=$$(docker ps -a --filter label=hearth.managed=true --format '{{.ID}} {{.Label "hearth.instance"}}' | awk '$$2 ~ /^test-/ {print $$1}'); \
	  if [ -n "$$ids" ]; then echo "removing leftover test containers: $$ids"; docker rm -f $$ids >/dev/null; fi
	@ids=$$(docker network ls --filter label=hearth.managed=true --format '{{.ID}} {{.Label "hearth.instance"}}' | awk '$$2 ~ /^test-/ {print $$1}'); \
	  if [ -n "$$ids" ]; then echo "removing leftover test networks: $$ids"; docker network rm $$ids >/dev/null; fi
