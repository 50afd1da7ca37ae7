# Two commands on a fresh machine with Python 3.11 and make: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test tools lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[server,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ledger demo

# Test servers and clients, built or installed once per machine into ~/.cache/room-ledger (tests also
# do it on first use). A client that cannot be installed here (no Go, no npm) makes its tests skip.
tools:
	tools/go-tool livekit-server
	-tools/go-client
	-tools/js-client

test: $(STAMP) tools
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run

clean:
	-[ -x $(BIN)/ledger ] && $(BIN)/ledger down
	rm -rf $(VENV) .ledger
