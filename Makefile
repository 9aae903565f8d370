# make setup | make demo | make test | make bench
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean

$(PY):
	bash scripts/setup.sh

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lance demo

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -q

test-fast: $(PY)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -m "not slow and not ray and not deepspeed"

bench: $(PY)
	$(PY) bench/attention.py
	$(PY) bench/model_step.py

clean:
	rm -rf runs bench/results .pytest_cache
