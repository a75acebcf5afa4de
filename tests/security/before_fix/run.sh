#!/usr/bin/env bash
# Run main's hostile-device tests against the service as it was before the security work (issue 9).
#   tests/security/before_fix/run.sh [OLD_COMMIT] [pytest args...]
# OLD_COMMIT defaults to the first parent of the oldest "Merge branch 'sec'" on main's first-parent line.
# Uses this checkout's .venv for the test process; the service child runs the old tree (PYTHONPATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/../../.." && pwd)"
old="${1:-}"
[ $# -gt 0 ] && shift
if [ -z "$old" ]; then
  merge="$(git -C "$here" log --first-parent --format='%h %s' main | grep "Merge branch 'sec'" | tail -1 | cut -d' ' -f1)"
  old="$(git -C "$here" rev-parse "$merge^1")"
fi
tree="${LEPTON_BEFORE_FIX_TREE:-/tmp/lepton-before-fix-$(git -C "$here" rev-parse --short "$old")}"
if [ ! -d "$tree/lepton_edge" ]; then
  git -C "$here" worktree add --detach "$tree" "$old" >/dev/null
fi
echo "old tree: $tree at $(git -C "$tree" log --oneline -1 | cut -c1-80)" >&2
cd "$here"
LEPTON_BEFORE_FIX_TREE="$tree" timeout 3600 .venv/bin/python -m pytest -p no:cacheprovider \
  tests/security/before_fix/test_hostile_device_before_fix.py "$@"
