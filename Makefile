# One command each: `make run` (set up + refit on the embedded default), `make test`.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.soapflow-installed
DEBS   := dataset-fashion-mnist opencv-doc
# what the tests drive besides Python: a headless browser renders the HTML reports
TEST_DEBS := chromium

.PHONY: setup debs test-debs test run bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# timm needs torchvision; this pair installs together (see README)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Real data from Debian packages (Fashion-MNIST, OpenCV's sample photos) when we may install them.
debs:
	@if dpkg -s $(DEBS) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) >/dev/null) \
	  || echo "warning: could not install $(DEBS); continuing without them"; \
	else echo "note: not root; run 'sudo apt-get install $(DEBS)' for Fashion-MNIST and more photos"; fi

setup: $(STAMP) debs

# The tests fail (they do not skip) without these, so install them when we may.
test-debs:
	@if dpkg -s $(TEST_DEBS) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_DEBS) >/dev/null) \
	  || echo "warning: could not install $(TEST_DEBS); the browser tests will fail"; \
	else echo "note: not root; run 'sudo apt-get install $(TEST_DEBS)' for the browser tests"; fi

test: setup test-debs
	$(BIN)/pytest -q

run: setup
	$(BIN)/soap refit

bench: setup
	$(BIN)/python benchmarks/noise.py
	$(BIN)/python benchmarks/fit.py
	$(BIN)/python benchmarks/forward_batch.py
	$(BIN)/python benchmarks/store_write.py
	$(BIN)/python benchmarks/jpeg_loader.py
	$(BIN)/python benchmarks/refit.py
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --cpu-dry-run

clean:
	rm -rf $(VENV) .pytest_cache
