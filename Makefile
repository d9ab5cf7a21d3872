# Two tested stacks: the paper's (requirements.txt, in VENV) and today's releases (requirements-latest.txt,
# in VENV_LATEST). Either venv can live anywhere, e.g. `make test VENV=~/venvs/ista2`.
VENV ?= .venv
VENV_LATEST ?= .venv-latest
PY := $(VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: venv venv-latest test test-latest demo table bench gpu-check

# $(1): the venv folder, $(2): its requirements file. The venv is (re)filled when the file changes; the
# editable install is redone every time, since a reused venv may point at another checkout.
define fill_venv
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip $(PIP_FLAGS) install -r $(2)
	cp $(2) $(1)/.requirements
endef
define install_project
	$(1)/bin/python -m pip $(PIP_FLAGS) install --no-deps --no-build-isolation -e .
endef
# lint, then the whole suite in two test processes (one test file each), with the python of venv $(1)
define suite
	$(1)/bin/python -m ruff check common tests benchmarks PVT SWIN CVT
	$(1)/bin/python -m pytest -q -n 2 --dist loadfile
endef

$(VENV)/.requirements: requirements.txt
	$(call fill_venv,$(VENV),requirements.txt)

$(VENV_LATEST)/.requirements: requirements-latest.txt
	$(call fill_venv,$(VENV_LATEST),requirements-latest.txt)

venv: $(VENV)/.requirements
	$(call install_project,$(VENV))

venv-latest: $(VENV_LATEST)/.requirements
	$(call install_project,$(VENV_LATEST))

test: venv
	$(call suite,$(VENV))

test-latest: venv-latest
	$(call suite,$(VENV_LATEST))

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
