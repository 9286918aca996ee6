# Two commands do all set-up: `make demo` runs the examples on the embedded default model, `make test` the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull a CUDA build of several GB.
TORCH_PIN := torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]' $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/text_completion.py
	$(PY) examples/chat_completion.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
