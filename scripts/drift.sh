#!/usr/bin/env bash
# Drift check (not part of CI): install the newest releases pyproject.toml allows into a
# throwaway environment, print which packages moved against requirements/lock.txt, run
# the test suite there and print which tests broke.
#   ./scripts/drift.sh                  # report only
#   ./scripts/drift.sh --update-lock    # and, if the suite passed, write the new lock
# Extra arguments after the flag go to pytest (e.g. -x, -k falcon).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATE=0
if [ "${1:-}" = "--update-lock" ]; then UPDATE=1; shift; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgeia3-drift.XXXXXX")"
VENV="$WORK/venv"
echo "drift check in $WORK"
EDGEIA3_UNLOCKED=1 VENV="$VENV" ./scripts/setup.sh
"$VENV/bin/python" -m pip freeze --exclude-editable > "$WORK/freeze.txt"
"$VENV/bin/python" scripts/lockfile.py diff requirements/lock.txt "$WORK/freeze.txt"
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE --junitxml="$WORK/junit.xml" "$@" | tee "$WORK/pytest.txt"
STATUS=${PIPESTATUS[0]}
set -e
"$VENV/bin/python" scripts/lockfile.py broken "$WORK/junit.xml"
if [ "$STATUS" = 0 ] && [ "$UPDATE" = 1 ]; then
  "$VENV/bin/python" scripts/lockfile.py write "$WORK/freeze.txt" requirements/lock.txt
  echo "requirements/lock.txt refreshed: commit it with the fixes the new releases needed"
elif [ "$STATUS" != 0 ]; then
  echo "the suite fails on the newest releases (exit $STATUS); the lock stays as it is"
fi
exit "$STATUS"
