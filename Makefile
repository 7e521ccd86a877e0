# supervisord-qnx: everything a fresh Debian machine needs is installed from here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= config/supervisord.toml
PYTEST_ARGS ?=

.PHONY: help run check test test-cgroup2 lint typecheck unit bench bench-deps mutate soak clean system-deps test-deps vm-deps venv

help:
	@echo "make run     start the daemon in the foreground on $(CONFIG) (runtime files in ./run/)"
	@echo "make test    install everything, lint, type-check and run the whole test suite"
	@echo "make test-cgroup2  run the cgroup2 scenarios in a VM on Debian's kernel (root)"
	@echo "make bench   run the benchmarks in bench/ and print the figures"
	@echo "make check   validate $(CONFIG) and print the partition tree"
	@echo "make mutate  mutation-test the pure core (about 8 min; see docs/testing.md)"
	@echo "make soak    the chaos soak for SOAK_SECONDS (default 600; see docs/reliability.md)"
	@echo "make clean   remove .venv and ./run"

# System packages a fresh machine may lack. Running needs venv support for python3
# and util-linux (setpriv, unshare, chrt, taskset, prlimit: the exec wrappers that
# confine and schedule workers, partition/process.py), and libseccomp's Python binding
# (python3-seccomp: the `seccomp` tenant key compiles its filter with it, which an
# interpreter of the same ABI loads from Debian's dist-packages, partition/seccomp.py);
# the tests also use procps and systemd
# (`systemd-analyze verify` of the service unit). Root installs what is
# missing (apt-get update first); others are told what to install.
define apt_install
	@missing=""; for pair in $(1); do \
	  check=$${pair%%:*}; pkg=$${pair#*:}; \
	  sh -c "$$check" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing; \
	  else \
	    echo "missing system packages:$$missing (as root: apt-get install$$missing)"; exit 1; \
	  fi; \
	fi
endef

RUN_DEPS  := "$(PY) -c 'import venv, ensurepip':python3-venv" "command -v setpriv:util-linux" \
	"command -v unshare:util-linux" "dpkg -s python3-seccomp:python3-seccomp"
TEST_DEPS := "command -v ps:procps" "command -v taskset:util-linux" "command -v systemd-analyze:systemd"

system-deps:
	$(call apt_install,$(RUN_DEPS))

test-deps:
	$(call apt_install,$(TEST_DEPS))

# The cgroup2 VM (tests/vm/run.sh): QEMU, Debian's kernel to boot, and a static busybox
# for the initramfs virtme-ng builds (a dynamic one cannot run there). Installing the
# kernel only adds files under /boot and /lib/modules; nothing boots it but the VM.
VM_DEPS := "command -v qemu-system-x86_64:qemu-system-x86" \
	"dpkg -s linux-image-amd64:linux-image-amd64" "dpkg -s busybox-static:busybox-static"

vm-deps:
	$(call apt_install,$(VM_DEPS),--no-install-recommends)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	mkdir -p run
	$(BIN)/supervisord-qnx --config $(CONFIG)

check: $(STAMP)
	$(BIN)/supervisord-qnx --config $(CONFIG) --check

lint: $(STAMP)
	$(BIN)/ruff check supervisord_qnx tests bench qnx-sim
	$(BIN)/ruff format --check supervisord_qnx tests bench qnx-sim

# The package strictly; tests and benchmarks checked too (pyproject's overrides).
typecheck: $(STAMP)
	$(BIN)/mypy supervisord_qnx
	$(BIN)/mypy tests bench

test: test-deps lint typecheck
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# virtme-ng (vng) comes from PyPI through the project's `vm` extra.
VM_STAMP := $(VENV)/.installed-vm

$(VM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,vm]'
	touch $(VM_STAMP)

# The cgroup2 scenarios on a real kernel: 3 to 4.5 minutes under software emulation.
test-cgroup2: vm-deps test-deps $(VM_STAMP)
	tests/vm/run.sh $(PYTEST_ARGS)

# The peers the benchmarks compare with, each in its own environment: supervisord and
# circus (and the profilers) in bench/.venv-compare, never the project's .venv; s6 from
# Debian's package.
COMPARE_VENV := bench/.venv-compare
BENCH_DEPS := "command -v s6-svscan:s6"

bench-deps: system-deps
	$(call apt_install,$(BENCH_DEPS))
	@test -x $(COMPARE_VENV)/bin/circusd -a -x $(COMPARE_VENV)/bin/py-spy || { \
	  $(PY) -m venv $(COMPARE_VENV) && \
	  $(COMPARE_VENV)/bin/pip install -q supervisor circus py-spy pyinstrument; }

bench: $(STAMP) bench-deps
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Mutation testing of the pure core against its fast unit tests; configured in
# pyproject.toml ([tool.mutmut]). Not part of `make test`: it takes minutes. Starts
# from scratch each time (mutants/ is mutmut's working copy and cache).
mutate: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,mutation]'
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/python -m tests.mutation_report

# The chaos soak (tests/soak) for longer than the 60 s `make test` gives it, with its
# figures printed. Root, for cgroup v1: SOAK_SECONDS=3600 make soak.
SOAK_SECONDS ?= 600

soak: test-deps $(STAMP)
	$(BIN)/python -m pytest -q -s -ra tests/soak --soak-seconds=$(SOAK_SECONDS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) run build mutants *.egg-info
