# VENV can point anywhere, e.g. `make test VENV=~/venvs/ista2`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv test demo table bench gpu-check

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -r requirements.txt
	cp requirements.txt $@

# The editable install is redone every time: a reused venv may point at another checkout.
venv: $(VENV)/.requirements
	$(PIP) install --no-deps --no-build-isolation -e .

test: venv
	$(PY) -m ruff check common tests benchmarks PVT SWIN CVT
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: venv
	cd PVT/classification && $(abspath $(PY)) demo.py

table: venv
	$(PY) benchmarks/table.py

bench: venv
	$(PY) benchmarks/bench_ista2.py
	$(PY) benchmarks/bench_train_step.py

# One GPU, under 10 minutes: ISTA2 on CUDA against the float64 oracle, NCCL, the three trainers with AMP
# through their launchers, and the speed table (benchmarks/gpu_check.py; exit status 1 if a check fails).
gpu-check: venv
	$(PY) benchmarks/gpu_check.py
