# Quick start: `make demo` and `make test` each do all set-up on a fresh Debian 12
# machine (root, apt reachable) and are near no-ops when already set up.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export LIBTBX_BUILD := /usr/lib/cctbx/python3.11
DEMO_DIR ?= demo_output

.PHONY: setup demo test test-fast clean benchmarks

# System packages: DIALS 3.12 (dxtbx, cctbx), MPI, pyFAI, numba; fabio/h5py (EDF, HDF5 images and exports),
# gemmi (MTZ export, CIF), plotly + jinja2 (diffuse.report), chromium (the report's browser test).
# Only installs what is missing.
.setup-system.stamp:
	@if ! /usr/bin/python3 -c "import dials, dxtbx, mpi4py, pyFAI, numba, fabio, gemmi, h5py, plotly, jinja2" 2>/dev/null || ! command -v mpirun >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "Installing Debian packages (python3-dials, MPI, pyFAI, fabio, gemmi, h5py, plotly, jinja2, chromium)..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-dials python3-mpi4py openmpi-bin python3-pyfai python3-numba python3-venv python3-fabio python3-gemmi python3-h5py python3-plotly python3-jinja2 chromium >/dev/null; \
	fi
	@touch $@

$(VENV)/.installed: .setup-system.stamp pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

setup: $(VENV)/.installed

# Two pytest workers (the machine's two cores); conftest.py keeps each module, and all
# tests of the shared real-data DIALS runs, on one worker.
TEST_WORKERS ?= 2
test: setup
	@$(VENV)/bin/python -m pytest -q --timeout=1800 -n $(TEST_WORKERS) --dist loadgroup --durations=25

test-fast: setup
	@$(VENV)/bin/python -m pytest -q -m "not slow and not real_data and not mpi"

demo: setup
	@DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

benchmarks: setup
	@for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .setup-system.stamp $(DEMO_DIR) .pytest_cache
