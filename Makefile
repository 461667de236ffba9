# Two set-up commands work on a fresh clone of a fresh machine:
#   make demo   creates the virtualenv, installs p2pull and pulls a generated model
#   make test   installs what the tests need (system packages included) and runs them all
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the integration tests start: CNCF Distribution as the origin, skopeo as a
# second client, htpasswd for basic auth, iproute2/iptables for the namespace lab
SYSTEM_PACKAGES := docker-registry skopeo apache2-utils curl iproute2 iptables

.PHONY: demo test system-packages clean

$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed-base
	$(PY) -m p2pull.demo

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q $$missing; }; \
	fi

# pytest exits 5 when it collected no tests: that is a failure here, like any other code
test: system-packages $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider; status=$$?; \
	if [ $$status = 5 ]; then echo "no tests were collected"; fi; exit $$status

clean:
	rm -rf $(VENV) .demo *.egg-info
