# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-model test test-fast lint install wheel system-deps browser docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cscvision demo --out demo_out

# Rebuilds the committed demo model (synthetic data only) where the package carries it:
# cscvision/resources/models/demo-synthetic (models/demo-synthetic links there; --model demo).
demo-model: $(STAMP)
	$(BIN)/cscvision demo --out demo_out name=demo-synthetic \
		export_dir=cscvision/resources/models/demo-synthetic

# Debian packages the tests need, installed as root (as CI runs): Chromium and ChromeDriver
# for the browser tests (no test tool ever downloads a browser) and libturbojpeg for the
# DICOM converter (the `dicom` extra).
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
		ldconfig -p | grep -q libturbojpeg.so || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium chromium-driver libturbojpeg0 >/dev/null; }

browser: system-deps

test: $(STAMP) system-deps
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# dist/cscvision-VERSION.tar.gz and the wheel built from it (model and configs inside).
wheel: $(STAMP)
	$(BIN)/python -m build --outdir dist .

# The manual (mkdocs.yml, docs/) built offline into site/; strict: any warning fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) demo_out dist build site
