# Two tested stacks: the paper's (requirements.txt, in VENV) and today's releases (requirements-latest.txt,
# in VENV_LATEST). Either venv can live anywhere, e.g. `make test VENV=~/venvs/ista2`.
VENV ?= .venv
VENV_LATEST ?= .venv-latest
PY := $(VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: venv venv-latest test test-latest demo table bench gpu-check gpu-wheels

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
# lint, then the whole suite in two test processes (one test file each), then timm's own model tests for one
# registered <name>_ista2 model per timm family against its base model (tests/timm_model_tests.py; the first run
# downloads the installed timm's sdist), with the python of venv $(1)
define suite
	$(1)/bin/python -m ruff check common tests benchmarks PVT SWIN CVT
	$(1)/bin/python -m pytest -q -n 2 --dist loadfile
	$(1)/bin/python -m tests.timm_model_tests --one-per-family
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
# On a lent GPU machine without network, use its own torch and the wheels of gpu-wheels (docs/reproduce.md).
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

# .whl/: the wheels a lent GPU machine's image (CPython 3.12 with torch, timm, numpy, opencv-python-headless, ...;
# no network) lacks, for docs/reproduce.md's "On a lent GPU". The versions of requirements-latest.txt, then the needs
# of those that the image lacks too, at the versions that stack resolves to (mmengine's opencv-python is not carried:
# the image's opencv-python-headless is the same cv2). fvcore and iopath are sdists only: built here, pure Python.
latest_pin = $(or $(shell grep -i '^$(1)==' requirements-latest.txt),$(error requirements-latest.txt pins no $(1)))
GPU_BINARIES = $(foreach name,mmengine yacs tensorboardX,$(call latest_pin,$(name))) \
	addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 platformdirs==4.14.9
GPU_SDISTS = $(call latest_pin,fvcore) iopath==0.1.10
GPU_PLATFORMS := manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1
# $(1): a pin (name==version), $(2): its wheel's tag (a pattern); fails unless exactly one wheel in .whl matches
one_wheel = n=$$(ls .whl | grep -ic '^$(subst ==,-,$(1))-$(2)\.whl$$'); test $$n = 1 || \
	{ echo "gpu-wheels: $$n wheels $(subst ==,-,$(1))-$(2).whl in .whl, not 1" >&2; exit 1; }

gpu-wheels: $(VENV)/.requirements
	rm -rf .whl
	$(PY) -m pip $(PIP_FLAGS) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach p,$(GPU_PLATFORMS),--platform $(p)_x86_64) -d .whl $(GPU_BINARIES)
	$(PY) -m pip $(PIP_FLAGS) wheel --no-deps --no-build-isolation -w .whl $(GPU_SDISTS)
	@$(foreach pin,$(GPU_BINARIES),$(call one_wheel,$(pin),.*);) \
		$(foreach pin,$(GPU_SDISTS),$(call one_wheel,$(pin),py3-none-any);)
	@test $$(ls .whl | wc -l) = $(words $(GPU_BINARIES) $(GPU_SDISTS)) || \
		{ echo "gpu-wheels: other files in .whl:" >&2; ls .whl >&2; exit 1; }
	@echo "gpu-wheels: $$(ls .whl | wc -l) wheels, $$(du -ck .whl/*.whl | tail -1 | cut -f1) KiB in .whl" \
		"(a device call carries at most 64 MiB)"
