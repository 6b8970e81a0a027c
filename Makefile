# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is missing, OS packages included.

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed's JIT-compiled ops look for ninja and g++ on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo demo-simmim test test-fast os-deps clean gpu-wheels gpu-check

demo: $(STAMP)
	bash launch/demo.sh supervised

demo-simmim: $(STAMP)
	bash launch/demo.sh simmim

test: $(STAMP)
	$(PYTHON) -m pytest -q --durations=30

# tests/unit: tests/integration/conftest.py marks every integration test slow.
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

# A GPU machine without internet: `make gpu-wheels` here, bring build/gpu-wheels along, `make gpu-check` there
# (launch/gpu_check.sh; ARGS go to launch/gpu_check.py, e.g. ARGS="--only bench").
GPU_WHEELS ?= build/gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w $(GPU_WHEELS) $$($(PYTHON) -m launch.gpu_check pins pure)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(PYTHON) -m launch.gpu_check pins compiled)
	@ls $(GPU_WHEELS)
	@du -ch $(GPU_WHEELS)/*.whl | tail -1 | sed 's|total|total in $(GPU_WHEELS)|'

gpu-check:
	bash launch/gpu_check.sh $(ARGS)

clean:
	rm -rf runs demo .pytest_cache
