# rec-rllib — `make help` lists the targets. Every target installs what it needs into .venv first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/quickstart
# pytest worker processes (pytest-xdist; whole test files per worker, in collection order: the files with slow
# tests first, see tests/conftest.py). The suite's Ray, Serve and subprocess tests wait on each other's
# processes a third of the time, so two workers keep 2 cores busy (`make test WORKERS=0`: one process, no xdist)
WORKERS ?= 2
XDIST   := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile --no-loadscope-reorder)

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev extra

# the web page's test drives a real headless browser: Debian's chromium and chromedriver (apt, as root or
# through sudo), installed once when missing
BROWSER := $(VENV)/.browser-stamp
$(BROWSER): | $(STAMP)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing chromium and chromium-driver (Debian packages) for the web page's test"; \
	  $$sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	fi
	touch $@

run: $(STAMP) ## the main job end to end on an embedded local Ray (prepare -> fine-tune -> RL -> evaluate -> serve)
	$(PY) -m jobs.pipeline --out $(OUT)

test: $(STAMP) $(BROWSER) ## the whole test suite, exactly what CI runs (fails if pytest ran no test)
	@$(PY) -m pytest $(XDIST); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP) $(BROWSER) ## the suite without tests marked slow
	$(PY) -m pytest $(XDIST) -m "not slow"

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: ## list the benchmarks (bench/*.py: run one alone, it prints its figures; docs/benchmarks.md)
	@grep -E '^\| `python bench/' docs/benchmarks.md | cut -d'|' -f2,3 | sed -e 's/`//g' -e 's/^ */  /'

clean: ## remove the virtual environment and caches (keeps data/ and runs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache
