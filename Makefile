# make setup | make demo | make test   (Debian, Python >= 3.10, no GPU needed)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := ffmpeg rtsp-server-perl mosquitto dataset-fashion-mnist python3-gi gir1.2-gst-rtsp-server-1.0 \
	gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
DEMO_OUT ?= out/default
# Optional: when the ImageNet sample sits beside the repo, the demo report also gets top-1 (not required).
DEMO_EVAL ?= $(wildcard ../shared/data/imagenet-sample/labels.csv)

.PHONY: setup demo test apt clean

setup: apt $(VENV)/.installed

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || \
	      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  else \
	    echo "edgepipe: missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing"; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/edgepipe demo --out $(DEMO_OUT) $(if $(DEMO_EVAL),--eval-data $(DEMO_EVAL))

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
