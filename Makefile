# sluice — the two commands that matter: `make bench` and `make test`.
# Both install what they need (apt packages) when it is missing; run as root.

SHELL := /bin/bash
CARGO ?= cargo
# redis-server, redis-tools: a real client (redis-benchmark) in make test and
# make bench, against a redis-server of their own in a pod namespace (the
# package's system service, on 127.0.0.1 of the machine, is never used).
APT_PACKAGES := iptables iproute2 conntrack clang libelf-dev zlib1g-dev pkg-config linux-libc-dev bpftool nftables redis-server redis-tools
# curl, python3: the README's quickstarts, which bench/tests/quickstart.rs runs.
APT_PACKAGES += curl python3
# valgrind: sluice's user-space instructions per connection (callgrind),
# bench-check's machine-independent gate on its CPU work, and its test.
APT_PACKAGES += valgrind
# podman, runc, mmdebstrap: `make image`, and its test in make test (the
# runtime stage's base made from Debian's archive, run by runc: see image).
IMAGE_PACKAGES := podman runc mmdebstrap
# linux-perf: the interceptors' syscall counts (perf stat) and `make profile`.
BENCH_PACKAGES := haproxy linux-perf
PROFILE_PACKAGES := strace

.PHONY: all deps image image-deps image-base bench-deps profile-deps profile build test lint bench bench-check bench-check-selftest bench-baseline bench-micro bench-micro-baseline bench-micro-check clean check-leftovers

all: build

# Installs the Debian packages the tests need, only when one is missing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench-deps: deps
	@missing=""; for p in $(BENCH_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build:
	$(CARGO) build --release --workspace

# `make profile`: where one scenario's interceptor spends its CPU and its
# syscalls under the CRR load. A flame graph of `perf record` (folded stacks
# beside it) and the syscalls per connection (perf stat, then strace -c by
# name) under results/profile/. PROFILE_SCENARIO: a built-in scenario (tproxy,
# tproxy-bypass, ebpf-splice, haproxy, ...) or NAME=SLUICE-RUN-ARGS;
# PROFILE_SECONDS: each CRR pass.
PROFILE_SCENARIO ?= tproxy
PROFILE_SECONDS ?= 5
PROFILE_NAME = $(firstword $(subst =, ,$(PROFILE_SCENARIO)))
PROFILE_DATA = target/profile/$(PROFILE_NAME).perf.data
profile-deps: bench-deps
	@missing=""; for p in $(PROFILE_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# inferno (crates.io) folds perf's stacks and draws the SVG; Debian has
	@# no flame graph package.
	@command -v inferno-flamegraph >/dev/null 2>&1 || $(CARGO) install inferno --locked

profile: profile-deps
	$(CARGO) build --release --workspace
	./target/release/sluice-bench profile --sluice ./target/release/sluice \
	  --scenario '$(PROFILE_SCENARIO)' --seconds $(PROFILE_SECONDS) \
	  --work target/profile --out results/profile
	@# The folded stacks (megabytes) stay under target/; the SVG holds them.
	set -o pipefail; perf script -i $(PROFILE_DATA) 2>/dev/null | inferno-collapse-perf > target/profile/$(PROFILE_NAME).folded
	inferno-flamegraph --title "sluice-bench profile: $(PROFILE_NAME), CRR" \
	  < target/profile/$(PROFILE_NAME).folded > results/profile/$(PROFILE_NAME).svg
	@echo "wrote results/profile/$(PROFILE_NAME).svg and .txt (folded stacks: target/profile/)"
	@$(MAKE) --no-print-directory check-leftovers

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test, the namespace ones included; then proof that none was left behind.
# The image test needs the image base; where none can be made (no container
# runtime works), that test says so and skips.
test: deps lint image-deps
	@$(MAKE) --no-print-directory image-base || echo "make test: no image base; the image test will skip (see above)"
	@mkdir -p target; set -o pipefail; $(CARGO) test --workspace 2>&1 | tee target/test.log
	@$(MAKE) --no-print-directory check-leftovers
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "tests: %d passed, %d failed\n", p, f }' target/test.log

check-leftovers:
	@left=$$(ip netns list | awk '{print $$1}' | grep '^sl-' || true); \
	if [ -n "$$left" ]; then echo "network namespaces left behind: $$left"; exit 1; fi

# The comparison: BENCH_PROFILE=smoke|quick|default. Only the default
# profile writes results/ (the committed report); the others write
# target/bench-<profile>/ unless BENCH_OUT says otherwise.
bench: bench-deps
	$(CARGO) build --release --workspace
	./target/release/sluice-bench --sluice ./target/release/sluice
	@$(MAKE) --no-print-directory check-leftovers

# Criterion micro-benchmarks of the forwarders on 127.0.0.1 (no namespace);
# a baseline is saved under the target directory's criterion/ and compared
# with later (criterion reports each change; it does not fail on one).
MICRO_BENCH := $(CARGO) bench -p sluice-bench --bench forwarders

bench-micro: deps
	$(MICRO_BENCH)

bench-micro-baseline: deps
	$(MICRO_BENCH) -- --save-baseline main

bench-micro-check: deps
	@ls -d $${CRITERION_HOME:-$${CARGO_TARGET_DIR:-target}/criterion}/*/*/main >/dev/null 2>&1 || \
	  { echo "no saved micro-benchmark baseline 'main': run 'make bench-micro-baseline' first"; exit 1; }
	$(MICRO_BENCH) -- --baseline main

# The regression check (README: "Catching a slowdown"): the sluice of
# revision BASE [default: the commit results/baseline.json records] and the
# working tree's, run in turns on this machine and judged figure by figure
# (bench/src/ab.rs). Where no base can be built, it says so and compares
# with the committed results/baseline.json instead. BENCH_CHECK_ARGS: more
# arguments for `sluice-bench check` (e.g. --scenarios, --max-pairs).
BASE ?=
BENCH_CHECK_ARGS ?=
bench-check: bench-deps
	$(CARGO) build --release --workspace
	@if base=$$(BASE='$(BASE)' CARGO='$(CARGO)' bench/build-base); then \
	  set -x; ./target/release/sluice-bench check --sluice ./target/release/sluice \
	    --base-sluice "$${base#* }" --base-name "$${base%% *}" $(BENCH_CHECK_ARGS); \
	else \
	  set -x; ./target/release/sluice-bench check --sluice ./target/release/sluice \
	    --baseline results/baseline.json --no-base "bench/build-base made no base build (it said why above)" $(BENCH_CHECK_ARGS); \
	fi
	@$(MAKE) --no-print-directory check-leftovers

# The check's own error rates (README): SELFTEST_RUNS checks of each case,
# the same sluice on both sides: unchanged (must pass), head with
# SELFTEST_WORK rounds of arithmetic per connection (7500: about 8 µs, some
# 10% of CRR), head with one extra
# syscall per connection (both must fail). Hours; not in CI. Needs sluice's
# cargo feature bench-inject (built into target/bench-inject/).
SELFTEST_RUNS ?= 10
SELFTEST_WORK ?= 7500
SELFTEST_CASES ?= same work syscall
bench-check-selftest: bench-deps
	$(CARGO) build --release --workspace
	CARGO_TARGET_DIR=target/bench-inject $(CARGO) build --release -p sluice --bin sluice --features bench-inject
	RUNS='$(SELFTEST_RUNS)' WORK='$(SELFTEST_WORK)' CASES='$(SELFTEST_CASES)' \
	  bench/check-selftest $(BENCH_CHECK_ARGS)
	@$(MAKE) --no-print-directory check-leftovers

# Rewrites results/baseline.json from BASELINE_RUNS runs of the check profile
# (see README: when to do it).
BASELINE_RUNS ?= 5
bench-baseline: bench-deps
	$(CARGO) build --release --workspace
	./target/release/sluice-bench baseline --sluice ./target/release/sluice --runs $(BASELINE_RUNS) --out results/baseline.json
	@$(MAKE) --no-print-directory check-leftovers

# The image (Containerfile): IMAGE, from target/release/sluice on
# IMAGE_BASE, a Debian base made here from Debian's archive (mmdebstrap),
# because these machines reach no container registry. With a registry:
#   podman build --build-arg BASE=docker.io/library/debian:bookworm-slim -t sluice:0.1.0 .
# (compiles sluice in rust:1-bookworm). podman's defaults do not run on these
# VMs: crun refuses cgroup v1's hybrid mode (hence runc, cgroupfs), and its
# default rlimits exceed the machine's (hence --ulimit).
IMAGE ?= sluice:$(shell sed -n 's/^version = "\(.*\)"/\1/p' proxy/Cargo.toml)
IMAGE_BASE ?= localhost/sluice-base:bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
PODMAN ?= podman --runtime runc --cgroup-manager=cgroupfs
PODMAN_BUILD_ARGS := --ulimit nofile=1024:1024 --ulimit nproc=1024:1024

image-deps:
	@missing=""; for p in $(IMAGE_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Debian's essential set, iptables (nft and legacy), setcap and libelf: what
# the runtime stage needs and no package manager to fetch more with.
image-base: image-deps
	@$(PODMAN) image exists $(IMAGE_BASE) || { \
	  set -e; mkdir -p target/image; \
	  mmdebstrap --variant=essential --include=iptables,libcap2-bin,libelf1 \
	    --aptopt='APT::Install-Recommends "false"' --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
	    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
	    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
	    bookworm target/image/base.tar $(DEBIAN_MIRROR); \
	  $(PODMAN) import target/image/base.tar $(IMAGE_BASE); \
	  rm -f target/image/base.tar; }

image: image-base
	$(CARGO) build --release -p sluice --bin sluice
	@# The release profile's debug info is for make profile, not the image.
	strip -o target/image/sluice target/release/sluice
	$(PODMAN) build $(PODMAN_BUILD_ARGS) --build-arg BASE=$(IMAGE_BASE) \
	  --build-arg SLUICE_FROM=prebuilt --build-arg SLUICE_BIN=target/image/sluice \
	  -t $(IMAGE) -f Containerfile .
	@$(PODMAN) image inspect $(IMAGE) --format 'built $(IMAGE): {{.Size}} bytes'

clean:
	$(CARGO) clean
