# Two things a newcomer runs: `make test` (installs into .venv, runs the suite) and `make demo`
# (trains the tiny model on the shipped sample data on the CPU). The real job runs in the container;
# `make image-test` builds it with podman and runs the job in it (.ci/image-test.sh, docs/IMAGE.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install test image-test demo clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/pip install -q -r requirements-test.txt -c constraints.txt

test: install
	$(BIN)/python -m pytest

image-test:
	bash .ci/image-test.sh

demo: install
	$(BIN)/python -m job tiny-model output/tiny-llama
	REQUIRE_GPU=false BASE_MODEL=output/tiny-llama DATASET=data/persona_sample.jsonl \
	OPTIM=adamw_torch LORA_TARGET_MODULES=all-linear LEARNING_RATE=1e-2 MAX_STEPS=40 SAVE_STEPS=20 \
	LOGGING_STEPS=5 EVAL_STEPS=20 NUM_SAMPLES=200 RUN_ID=cpu-demo \
	CHECKPOINT_URI=./output/demo-checkpoints OUTPUT_DIR=output/demo $(BIN)/python -m job train

clean:
	rm -rf output checkpoints
