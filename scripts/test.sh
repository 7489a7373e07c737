#!/usr/bin/env bash
# Run the test suite: creates/uses the virtual environment (.venv, or $VENV),
# installs megatron_asvr with its dev extras, then runs pytest with any extra args.
# With none: the whole suite on $TEST_WORKERS pytest-xdist workers (default 2), a file at a time per
# worker (a module's fixtures are built once), the longest files first (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PYTEST_ARGS=("$@")
[ ${#PYTEST_ARGS[@]} -eq 0 ] && PYTEST_ARGS=(tests -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
set +e
python -m pytest "${PYTEST_ARGS[@]}"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "pytest collected no tests"
    exit 0
fi
exit $rc
