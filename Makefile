# make demo / make test work from a fresh clone: they create .venv when no virtualenv is
# active, install the CPU build of torch 2.13.0 when no torch is importable (a plain `torch`
# requirement would pull a multi-GB CUDA build), then build prefkernels against that torch
# (without build isolation, so the build tools setuptools and wheel are installed first).
ifdef VIRTUAL_ENV
PYTHON := $(VIRTUAL_ENV)/bin/python
else
PYTHON := .venv/bin/python
endif
# one install stamp per checkout: an active virtualenv may serve several
STAMP := $(dir $(PYTHON)).prefkernels-installed$(subst /,_,$(CURDIR))
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*)
PYTEST_ARGS ?=

.PHONY: install demo quickstart test bench clean

$(PYTHON):
	python3 -m venv .venv

$(STAMP): $(PYTHON) $(SOURCES)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install "setuptools>=64" wheel
	$(PYTHON) -m pip install -e ".[test]" --no-build-isolation
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m prefkernels demo --overwrite

quickstart: $(STAMP)
	$(PYTHON) python/quickstart.py

test: $(STAMP)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_op.py

clean:  # the stamp too: the next target rebuilds prefkernels._C
	rm -rf build *.egg-info prefkernels/*.so $(STAMP)
