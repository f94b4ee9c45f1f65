#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: installs what it needs
# (redis-server through apt if missing, a virtualenv with the package and its test extras),
# then lint, format check, type check and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the suite drives for real: a private redis-server per test module, and
# Debian's chromium for the gallery's browser test (Playwright drives it; it never downloads
# a browser of its own).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} with apt" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# torch only where a CPU build lies on disk (this machine kind has one): a plain `pip install
# torch` elsewhere would pull a multi-GB CUDA build. Without it the Grad-CAM example's test skips.
if compgen -G "${PIP_FIND_LINKS:-/nonexistent}/torch-2.13.0+cpu-*.whl" >/dev/null; then
    .venv/bin/python -m pip install --quiet torch==2.13.0
fi

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy (strict: producer/, worker/)"
.venv/bin/mypy
# RabbitMQ for the AMQP broker tests: started if installed and stopped (they skip, loudly, without it).
if command -v rabbitmqctl >/dev/null 2>&1 && ! rabbitmqctl --quiet status >/dev/null 2>&1; then
    rabbitmq-server -detached || true
    rabbitmqctl --quiet await_startup >/dev/null 2>&1 || true
fi
echo "== pytest"
.venv/bin/python -m pytest "$@"
