#!/usr/bin/env bash
# The README's test command: starts the local brokers the suites need
# (scripts/brokers.sh; reuses any already running), then runs every test of
# the workspace with all features, real brokers included.
#
# Broker suites read SWITCHYARD_*_URL; with SWITCHYARD_REQUIRE_BROKERS=1 (CI)
# a missing broker fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh
brokers_start
# Stop, on exit, only the brokers this run started (by PID).
if [ -n "${SY_STARTED_BROKERS:-}" ]; then
    trap brokers_stop EXIT
fi

cargo test --workspace --all-features "$@"
