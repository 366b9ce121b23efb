# llmlab: make demo (install + run the default pipeline), make test (install + the whole test suite)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel here; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_PROGRESS_BARS := 1

.PHONY: install demo test test-fast clean mlflow-ui prefect-ui serve stop

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing else can pull a CUDA build in
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/llmlab run pipelines/tiny.yaml

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10 tests

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests

clean:
	rm -rf runs .llmlab

# Browse past runs (both bind 127.0.0.1 only; Ctrl+C stops them)
mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.llmlab/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

prefect-ui: install
	PREFECT_HOME=$(CURDIR)/.llmlab/prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200 --analytics-off

# Prefect server + process worker + MLflow UI on 127.0.0.1, deployments registered (make stop ends them)
serve: install
	$(BIN)/llmlab serve

stop:
	$(BIN)/llmlab stop
