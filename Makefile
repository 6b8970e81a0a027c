# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is missing, OS packages included.

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed's JIT-compiled ops look for ninja and g++ on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo demo-simmim test test-fast os-deps clean

demo: $(STAMP)
	bash launch/demo.sh supervised

demo-simmim: $(STAMP)
	bash launch/demo.sh simmim

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

os-deps:
	@if ! command -v g++ >/dev/null || ! command -v ninja >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++ ninja-build; \
	fi

$(STAMP): pyproject.toml | os-deps
	test -d $(VENV) || python3 -m venv $(VENV)
	# torch first, by itself: pip takes these exact builds from the local wheel cache when it has them.
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf runs demo .pytest_cache
