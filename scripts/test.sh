#!/usr/bin/env bash
# Install everything the tests need (Debian's etcd-server included) and run them.
# Safe to re-run; used verbatim by .ci/run. Set MESHFED_FULL=1 for the slow drills/benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# an unmodified TCP client and server for the sidecar's "any TCP protocol" test
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
# HTTP/1.1 load generator used by the benchmark harness (its CI smoke run included)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
# promtool checks every component's /metrics; curl and h2load are real HTTP clients
# for the sidecar's HTTP layer tests
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]} from Debian"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian packages start system services we do not use; the tests run their own on free ports.
  for svc in etcd redis-server prometheus; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
echo "== installing meshfed with its test extras"
# The machine's pip config may list local mirror folders that do not exist; pip warns
# about each one. Hide those warnings, but never hide a failed install.
pip_log=$(mktemp)
if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' >"$pip_log" 2>&1; then
  cat "$pip_log"; rm -f "$pip_log"; echo "pip install failed" >&2; exit 1
fi
grep -v '^WARNING: Location' "$pip_log" || true
rm -f "$pip_log"

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy trust federation sidecar gateway chaos
.venv/bin/mypy --explicit-package-bases bench/harness bench/run.py
echo "== pytest"
if [ "${MESHFED_FULL:-0}" = "1" ]; then
  exec .venv/bin/python -m pytest -q
else
  exec .venv/bin/python -m pytest -q -m "not slow"
fi
