# dicomflow: `make run` starts the embedded default, `make test` runs the whole suite.
# Both install what they need: Debian packages (when root), the venv, the Python packages.

VENV   ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN    := $(VENV)/bin
ARGS   ?=
# Debian packages: dcmtk (storescu/storescp, real DICOM peers), Ceph (mon, osd, python3-rados) for the
# Ceph backend and its tests, docker-compose (validates compose/), postgresql (the shared catalogue; the
# suite starts its own server), orthanc and its DICOMweb plugin (a real peer in the tests, benchmark baselines).
RUN_DEBS  := dcmtk
TEST_DEBS := dcmtk ceph-mon ceph-osd ceph-common python3-rados docker-compose postgresql orthanc orthanc-dicomweb rsyslog rsyslog-gnutls libxml2-utils
BENCH_DEBS := dcmtk orthanc orthanc-dicomweb

.PHONY: run test lint bench-ingest bench-retrieve venv venv-test venv-bench rados-link debs-run debs-test debs-bench clean

run: debs-run venv
	$(BIN)/dicomflow run $(ARGS)

test: debs-test venv-test rados-link
	$(BIN)/ruff check .
	$(BIN)/pytest $(ARGS)

lint: venv-test
	$(BIN)/ruff check .

bench-ingest: debs-bench venv
	$(BIN)/python bench/ingest.py

bench-retrieve: debs-bench venv-bench
	$(BIN)/python bench/retrieve.py $(ARGS)

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test
venv-bench: $(VENV)/.installed-bench

# `make run` installs only what the services need; `make test` adds the test tools.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	touch $@

debs-run:
	@scripts/debs.sh $(RUN_DEBS)
debs-test:
	@scripts/debs.sh $(TEST_DEBS)
debs-bench:
	@scripts/debs.sh $(BENCH_DEBS)

# Debian's librados binding is not on PyPI; make it importable from the venv (same CPython 3.11 ABI).
rados-link: venv
	@so=$$(ls /usr/lib/python3/dist-packages/rados.cpython-311-*.so 2>/dev/null | head -n1); \
	 sp=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	 if [ -n "$$so" ]; then ln -sf "$$so" "$$sp/"; fi

clean:
	rm -rf $(VENV) var .pytest_cache
