# Two entry points (README): `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test lint bench-dense clean

$(STAMP): pyproject.toml scripts/install_system_deps.sh scripts/setup_arm_qemu.sh
	bash scripts/install_system_deps.sh
	$(PIP) install --quiet --disable-pip-version-check -e ".[test,plot]"
	PYTHON=$(PYTHON) bash scripts/setup_arm_qemu.sh
	touch $(STAMP)

# The stamp outlives the packages when the Python environment is replaced: check the imports too.
install:
	@$(PYTHON) -c "import vitsparse, tvm" 2>/dev/null || rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

demo: install
	vitsparse demo

test: install
	lint-imports
	$(PYTHON) -m pytest -q

lint: install
	lint-imports
	ruff check vitsparse tests benchmarks
	ruff format --check vitsparse tests benchmarks

bench-dense: install
	$(PYTHON) benchmarks/dense.py

clean:
	rm -f $(STAMP)
