# Two commands for a fresh machine with Python 3.11:
#   make run    set up .venv and run the notebook pipeline headless (papermill) on the embedded sample
#   make test   set up .venv and run the test suite
PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.adaclip-installed
RUN        ?= default

.PHONY: setup run test lab manifests strip clean-run

setup: $(STAMP)

# Reinstall when the dependency list changes; `pip install -e` makes lib/ edits live.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,export,cluster]"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m adaclip.cli pipeline --run $(RUN)

test: $(STAMP)
	$(PY) -m pytest

# step through the notebooks interactively
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

manifests: $(STAMP)
	$(PY) -m adaclip.cli manifests

# notebooks are committed without outputs
strip: $(STAMP)
	$(PY) -m nbstripout notebooks/*.ipynb

clean-run:
	rm -rf results/$(RUN)
