#!/usr/bin/env bash
# Run the test suite: creates/uses the virtual environment (.venv, or $VENV),
# installs megatron_asvr with its dev extras, then runs pytest with any extra args.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PYTEST_ARGS=("$@")
[ ${#PYTEST_ARGS[@]} -eq 0 ] && PYTEST_ARGS=(tests)
set +e
python -m pytest "${PYTEST_ARGS[@]}"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "pytest collected no tests"
    exit 0
fi
exit $rc
