# segloop — the two commands a new user types are `make demo` and `make test`.
# Both create .venv and install what is missing; nothing else is needed on a fresh machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Label Studio's server pins Django, pyarrow, pytz ...: it gets a virtual environment of its own.
LS_VENV  := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
LABEL_STUDIO_VERSION := 1.23.2
DATA   ?= .segloop
PYTEST_ARGS ?=
DEMO_ARGS ?=
TASK ?= pets

.PHONY: help install install-all label-studio-venv label-studio system-deps demo demo-cluster lint test test-long test-fast prometheus bench clean

help:
	@echo "make demo   - install and run the whole loop locally (data, train, serve, monitor, retrain, promote)"
	@echo "make demo TASK=coco - the same loop for instance segmentation (COCO8-seg layout, Mask R-CNN)"
	@echo "make demo-cluster - the same loop on a simulated two-node cluster that shares no disk (root)"
	@echo "make demo DEMO_ARGS='--label-studio --simulate-annotator' - annotate in a local Label Studio"
	@echo "make label-studio - run a local Label Studio on 127.0.0.1:8080 (own venv, data in .segloop/label-studio)"
	@echo "make test   - install and run the test suite"
	@echo "make test-fast - tests without those marked slow"
	@echo "make test-long - the long tests (the COCO config's Mask R-CNN run, ~7 min)"
	@echo "make lint   - ruff lint and format check (make test runs it first)"
	@echo "make prometheus - run Prometheus against the local Ray cluster (monitoring/prometheus.yml)"
	@echo "make bench  - run the benchmarks in bench/"

# torch/torchvision are pinned in pyproject.toml; pip takes them from the local wheel index.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q label-studio==$(LABEL_STUDIO_VERSION)
	@# an empty, migrated database: each new server copies it instead of migrating (~30 s) at its first start
	rm -rf $(LS_VENV)/template && mkdir -p $(LS_VENV)/template
	cd $(LS_VENV)/template && LABEL_STUDIO_BASE_DATA_DIR=$$PWD SENTRY_DSN= LABEL_STUDIO_LATEST_VERSION_CHECK=false \
	  DJANGO_SETTINGS_MODULE=core.settings.label_studio \
	  PYTHONPATH=$$(../bin/python -c 'import label_studio, os; print(os.path.dirname(label_studio.__file__))') \
	  ../bin/python -m django migrate --no-input -v 0 >../migrate.log 2>&1 || { echo "Label Studio database migration failed: see $(LS_VENV)/migrate.log"; exit 1; }
	test -s $(LS_VENV)/template/label_studio.sqlite3 && rm -f $(LS_VENV)/template/.env
	touch $(LS_STAMP)

label-studio-venv: $(LS_STAMP)

# Both environments install side by side (2 cores: Label Studio's hides behind torch's).
install:
	@$(MAKE) --no-print-directory -j2 install-all

install-all: $(STAMP) $(LS_STAMP) system-deps

label-studio: install
	$(VENV)/bin/segloop queue label-studio --data-dir $(DATA)/label-studio --port 8080

# Prometheus and promtool come from Debian's package (used by the monitoring tests and `make prometheus`).
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing Debian's prometheus package (prometheus + promtool)"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  || echo "warning: could not install prometheus; the promtool/prometheus tests will fail"; }

demo: install
	$(VENV)/bin/segloop demo --task $(TASK) --data-dir $(DATA)/demo-$(TASK) $(DEMO_ARGS)

# The same loop on a simulated two-node cluster sharing no disk (root: a mount namespace), S3 + MLflow servers.
demo-cluster: install
	$(VENV)/bin/segloop demo --cluster --task $(TASK) --data-dir $(DATA)/demo-cluster-$(TASK) $(DEMO_ARGS)

# Lint and format check first (ruff, configured in pyproject.toml), then the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests marked `long` (over the CI budget on 2 cores: the COCO config's Mask R-CNN run).
test-long: install
	SEGLOOP_LONG_TESTS=1 $(PY) -m pytest -m long $(PYTEST_ARGS)

test-fast: install lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

prometheus: install
	prometheus --config.file=monitoring/prometheus.yml --storage.tsdb.path=$(DATA)/prometheus \
	  --web.listen-address=127.0.0.1:9090

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/serve.py
	$(PY) bench/label_efficiency.py

clean:
	rm -rf $(VENV) $(LS_VENV) $(DATA) .pytest_cache
