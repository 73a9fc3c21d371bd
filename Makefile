# Two commands set everything up on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPUS_DIR ?= data/demo_corpus
# Debian packages the corpus generator needs (libespeak-ng through ctypes).
SYS_PKGS := espeak-ng

.PHONY: demo test env sysdeps docker-check clean

DEMO_DIR   ?= nemo_experiments/demo
DEMO_BASE  := pretrained/jstip_general.nemo
DEMO_MODEL := $(DEMO_DIR)/jstip_demo.nemo
DEMO_TEST  := [$(CORPUS_DIR)/general_test_cuts.jsonl,$(CORPUS_DIR)/medical_test_cuts.jsonl,$(CORPUS_DIR)/banking_test_cuts.jsonl]
DEMO_T0    := $(shell date +%s)

# corpus (reused when complete) -> the committed general-speech model evaluated -> adapted with JSTIP and the domain
# text (an interrupted run resumes) -> evaluated -> the before/after table and one test utterance transcribed.
# Each step's output is reused when present (delete $(DEMO_DIR) to run it all again).
demo: env
	$(PY) -m nemo_jstip.prep.corpus out_dir=$(CORPUS_DIR)
	@[ -f $(DEMO_DIR)/before/metrics.json ] || $(PY) examples/jstip_eval.py model=$(DEMO_BASE) \
	  'data.manifest=$(DEMO_TEST)' output_dir=$(DEMO_DIR)/before name=general
	@[ -f $(DEMO_MODEL) ] || $(PY) examples/jstip_train.py --config-name jstip_demo data.corpus_dir=$(CORPUS_DIR) \
	  exp_manager.exp_dir=$(DEMO_DIR) model_out=$(DEMO_MODEL)
	@[ -f $(DEMO_DIR)/eval/metrics.json ] || $(PY) examples/jstip_eval.py model=$(DEMO_MODEL) \
	  'data.manifest=$(DEMO_TEST)' output_dir=$(DEMO_DIR)/eval name=jstip_demo log_dir=$(DEMO_DIR)/jstip_demo
	$(PY) -m nemo_jstip.plots "general-speech model=$(DEMO_DIR)/before" "adapted with JSTIP=$(DEMO_DIR)/eval" \
	  --out $(DEMO_DIR)/compare
	$(PY) examples/jstip_transcribe.py model=$(DEMO_MODEL) audio=$(CORPUS_DIR)/medical_test_cuts.jsonl limit=1
	@echo "make demo: $$(( $$(date +%s) - $(DEMO_T0) )) s; table: $(DEMO_DIR)/compare/compare.md"

test: env
	$(PY) -m pytest -q tests

env: sysdeps $(STAMP)

# Python 3.12: on PATH, else pyenv's interpreters, else a clear message.
$(STAMP): setup.py
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  py=""; \
	  for c in python3.12 "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do \
	    if "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	  if [ -z "$$py" ]; then echo "error: Python 3.12 not found; install python3.12 (with venv) and retry" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

sysdeps:
	@missing=""; for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  else echo "error: missing system packages:$$missing (as root: apt-get install$$missing)" >&2; exit 1; fi; \
	fi

# The Dockerfile's pip step, resolved without a Docker engine (needs PyPI): docs/docker.md
docker-check: env
	docker/check-deps.sh $(TORCH) $(MCORE)

clean:
	rm -rf $(VENV) $(CORPUS_DIR) *.egg-info
