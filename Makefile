# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs the
# pinned stack (constraints.txt) when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# pytest workers: the suite is dominated by single-threaded graph building, so 2 processes on
# 2 cores finish sooner than one.
TEST_WORKERS ?= 2

.PHONY: demo test clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nasfpn_tf.demo --gin_file=gin_configs/demo.gin --model_dir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
