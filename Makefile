# The front door. `make demo` and `make test` work on a fresh clone with only
# Python installed: they create .venv, build the extension and install the
# package into it, then run from outside the source tree so that the
# installed copy is what gets imported.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.deps-installed
SOURCES := $(wildcard greenback/*.py greenback/*.pyx greenback/*.pxd greenback/*.pyi greenback/*.h) setup.py pyproject.toml

UPSTREAM_VENV ?= .venv-upstream
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null)
# Every CPython 3.10-3.13 that pyenv has installed here.
WHEEL_PYTHONS ?= $(sort $(wildcard $(PYENV_ROOT)/versions/3.1[0-3].*/bin/python))

ASAN_VENV ?= .venv-asan
CC ?= cc
# greenlet switches stacks by copying them, which reads the redzones that ASan
# puts around instrumented stack variables: keep heap checks, skip stack ones.
ASAN_CFLAGS := -fsanitize=address --param asan-stack=0 -fno-omit-frame-pointer -g -O1
# CPython is not built with ASan, so its runtime is preloaded, with libstdc++
# for the C++ exceptions that greenlet throws internally.
ASAN_PRELOAD = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libstdc++.so.6)
ASAN_LOG := $(CURDIR)/.asan-report

.PHONY: help venv build install demo docs bench-neighbours test pytest test-upstream typecheck bench wheels wheels-smoke cibuildwheel-check test-debug test-asan test-soak clean

help:
	@echo "make demo      - set up .venv, build, run examples/quickstart.py"
	@echo "make test      - set up .venv, build, install; typecheck, then the whole suite"
	@echo "make docs      - the documentation site (warnings are errors), and its doctests"
	@echo "make typecheck - mypy --strict (package, tests, type tests) and stubtest"
	@echo "make pytest    - only the pytest suite (PYTEST_ARGS=... to select)"
	@echo "make test-upstream - upstream greenback 1.3.0's own tests, adapted, against the install"
	@echo "make bench     - benchmark against upstream greenback 1.3.0 (own venv)"
	@echo "make bench-neighbours - greenback beside similar libraries (own venv)"
	@echo "make wheels    - a manylinux wheel per CPython 3.10-3.13, each tested installed"
	@echo "make test-debug - the suite under python -X dev, PYTHONMALLOC=debug, -W error"
	@echo "make test-asan  - the suite against an AddressSanitizer+LeakSanitizer build"
	@echo "make test-soak  - the full-size soak test (minutes)"
	@echo "make build     - compile the extension in place (for development)"
	@echo "make clean     - remove build products"

# The venv with what building needs (the demo needs no more than this, the
# package and Trio); the test toolchain goes on top of it.
$(VENV)/.build-deps: requirements/build.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements/build.txt
	touch $@

$(STAMP): $(VENV)/.build-deps requirements/test.txt
	$(PIP) install -r requirements/test.txt
	touch $@

venv: $(STAMP)

# Build a wheel and install it (not editable), so tests see what users get:
# reinstalled even when the version is unchanged, then its run-time
# dependencies. The lock keeps builds for several venvs from sharing build/.
$(VENV)/.installed: $(VENV)/.build-deps $(SOURCES)
	rm -rf $(VENV)/dist
	$(PYTHON) scripts/locked.py .build.lock sh -c 'rm -rf build && $(VPY) -m pip wheel --no-build-isolation --no-deps -q -w $(VENV)/dist .'
	$(PIP) install --force-reinstall --no-deps $(VENV)/dist/greenback-*.whl
	$(PIP) install $(VENV)/dist/greenback-*.whl
	touch $@

install: $(VENV)/.installed $(STAMP)

build: $(VENV)/.build-deps
	$(VPY) setup.py -q build_ext --inplace

$(VENV)/.demo-deps: $(VENV)/.build-deps
	$(PIP) install "trio>=0.25"
	touch $@

demo: $(VENV)/.installed $(VENV)/.demo-deps
	cd examples && ../$(VPY) quickstart.py
	cd examples && ../$(VPY) -c 'import greenback; print("implementation:", greenback.__implementation__)'

# The documentation site: HTML with every warning an error and every
# cross-reference checked, then every doctest on it, against the installed
# package (Sphinx runs from docs/, so the source tree is not importable).
# The recipes it shows are programs under examples/, run by the test suite.
$(VENV)/.docs-deps: $(STAMP) requirements/docs.txt
	$(PIP) install -r requirements/docs.txt
	touch $@

docs: install $(VENV)/.docs-deps
	cd docs && ../$(VPY) -m sphinx -E -W -n --keep-going -q -b html . _build/html
	cd docs && ../$(VPY) -m sphinx -E -W -n --keep-going -q -b doctest . _build/doctest
	@echo "docs: built docs/_build/html/index.html; every doctest passed"

# mypy --strict over the package, the tests and tests/typing (whose
# `# type: ignore[code]` lines are mistakes the types must keep catching),
# then stubtest against the installed wheel, run from tests/ so that the
# installed copy is what gets imported.
typecheck: install
	$(VPY) -m mypy greenback tests benchmarks
	cd tests && ../$(VPY) -m mypy.stubtest greenback \
		--mypy-config-file ../pyproject.toml --allowlist ../stubtest-allowlist.txt

# The suite runs twice: against the compiled core, then against its
# pure-Python twin (--no-c-extensions).
pytest: install
	cd tests && ../$(VPY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)
	cd tests && ../$(VPY) -m pytest -p no:cacheprovider --no-c-extensions $(PYTEST_ARGS)

# Upstream greenback 1.3.0's own test suite, from its sdist (downloaded into
# .upstream-suite/), with the documented rewrites in the script, against the
# installed package: compiled, then pure-Python.
test-upstream: install
	$(VPY) scripts/upstream_suite.py --implementation compiled
	$(VPY) scripts/upstream_suite.py --implementation pure-python

test: typecheck pytest test-upstream cibuildwheel-check
	@echo "make test passed: mypy --strict and stubtest; the suite, compiled and pure-Python; upstream greenback's suite, compiled and pure-Python; the cibuildwheel build selection"

# Upstream greenback, the pure-Python original, in a venv of its own.
$(UPSTREAM_VENV)/.installed: requirements/bench-upstream.txt
	$(PYTHON) -m venv $(UPSTREAM_VENV)
	$(UPSTREAM_VENV)/bin/python -m pip --disable-pip-version-check -q install -r requirements/bench-upstream.txt
	touch $@

# Alternating processes of both implementations; rewrites docs/performance.md.
bench: install $(UPSTREAM_VENV)/.installed
	cd benchmarks && ../$(VPY) bench.py run --ours ../$(VPY) \
		--upstream ../$(UPSTREAM_VENV)/bin/python $(BENCH_ARGS)

# greenback beside awaitlet, SQLAlchemy's greenlet_spawn, greenletio,
# nest_asyncio(2), asgiref and anyio's from_thread: one scenario, timed and
# probed alike for each (the comparison on the overview page). Own venv.
NEIGHBOURS_VENV ?= .venv-neighbours
$(NEIGHBOURS_VENV)/.installed: $(VENV)/.installed requirements/neighbours.txt
	[ -x $(NEIGHBOURS_VENV)/bin/python ] || $(PYTHON) -m venv $(NEIGHBOURS_VENV)
	$(NEIGHBOURS_VENV)/bin/python -m pip --disable-pip-version-check -q install \
		-r requirements/neighbours.txt
	$(NEIGHBOURS_VENV)/bin/python -m pip --disable-pip-version-check -q install \
		--force-reinstall --no-deps $(VENV)/dist/greenback-*.whl
	$(NEIGHBOURS_VENV)/bin/python -m pip --disable-pip-version-check -q install \
		$(VENV)/dist/greenback-*.whl
	touch $@

bench-neighbours: $(NEIGHBOURS_VENV)/.installed
	cd benchmarks && ../$(NEIGHBOURS_VENV)/bin/python neighbours.py $(BENCH_ARGS)

# Debug runtime: dev mode (asyncio debug, extra checks), the debug memory
# allocator (guards, use-after-free patterns), every warning an error.
test-debug: install
	cd tests && PYTHONMALLOC=debug ../$(VPY) -X dev -W error -m pytest -p no:cacheprovider $(PYTEST_ARGS)
	cd tests && PYTHONMALLOC=debug ../$(VPY) -X dev -W error -m pytest -p no:cacheprovider --no-c-extensions $(PYTEST_ARGS)

# The compiled core built with AddressSanitizer (LeakSanitizer included), in a
# venv of its own. PYTHONMALLOC=malloc lets ASan see every object allocation.
# Reports go to $(ASAN_LOG).* (pytest captures stderr); any report fails.
$(ASAN_VENV)/.installed: requirements/test.txt $(SOURCES)
	[ -x $(ASAN_VENV)/bin/python ] || $(PYTHON) -m venv $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip --disable-pip-version-check -q install -r requirements/test.txt
	rm -rf $(ASAN_VENV)/dist
	$(PYTHON) scripts/locked.py .build.lock sh -c 'rm -rf build && GREENBACK_CFLAGS="$(ASAN_CFLAGS)" \
		GREENBACK_LDFLAGS="-fsanitize=address" \
		$(ASAN_VENV)/bin/python -m pip wheel -q --no-build-isolation --no-deps -w $(ASAN_VENV)/dist .'
	$(ASAN_VENV)/bin/python -m pip --disable-pip-version-check -q install \
		--force-reinstall --no-deps $(ASAN_VENV)/dist/greenback-*.whl
	touch $@

test-asan: $(ASAN_VENV)/.installed
	rm -f $(ASAN_LOG).*
	cd tests && LD_PRELOAD="$(ASAN_PRELOAD)" PYTHONMALLOC=malloc \
		ASAN_OPTIONS=detect_leaks=1:log_path=$(ASAN_LOG) \
		../$(ASAN_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)
	@if ls $(ASAN_LOG).* >/dev/null 2>&1; then cat $(ASAN_LOG).*; echo "AddressSanitizer reported the above"; exit 1; fi
	@echo "AddressSanitizer and LeakSanitizer: no reports"

# The soak test at full size: 1,000,000 await_ calls and 200,000 one-shot
# portals per loop, with memory, greenlet count and refcounts watched; and the
# stress tests (signal storms, gc at every allocation, tracing hooks) at full
# length.
test-soak: install
	cd tests && GREENBACK_SOAK_SCALE=1.0 ../$(VPY) -m pytest -p no:cacheprovider test_soak.py test_stress.py $(PYTEST_ARGS)

# A wheel per CPython found, repaired to a manylinux tag, installed into a
# fresh venv and tested there (full suite, compiled and pure).
wheels:
	scripts/wheels.sh $(WHEEL_PYTHONS)

# The same, with a quick subset of the suite.
wheels-smoke:
	scripts/wheels.sh --smoke $(WHEEL_PYTHONS)

# The cibuildwheel configuration in pyproject.toml parses and selects the
# CPython 3.10-3.14 builds, and no free-threaded ones (the builds themselves
# need Docker and run in the project's public CI workflow).
cibuildwheel-check: $(STAMP)
	$(VPY) -m cibuildwheel --platform linux --print-build-identifiers > .cibw-ids
	grep -q '^cp310-manylinux_x86_64$$' .cibw-ids
	grep -q '^cp313-manylinux_x86_64$$' .cibw-ids
	grep -q '^cp314-manylinux_x86_64$$' .cibw-ids
	! grep -qE '^(pp|cp3(8|9)-|cp3[0-9]+t-)' .cibw-ids

clean:
	rm -rf build dist docs/_build wheelhouse .build.lock .cibw-ids .asan-report.* *.egg-info greenback/*.c greenback/*.so greenback/*.html
