#!/usr/bin/env bash
# Run this checkout's .venv Python on the OLD tree's code, agent included (issue 9's "before" runs).
#   tests/security/before_fix/old_python.sh OLD_TREE [python args...]
# The editable install maps lepton_edge.agent to this checkout whatever PYTHONPATH says, through a
# finder that site.py loads from a .pth file. So Python runs with -S (no site, no .pth), the venv's
# site-packages goes on PYTHONPATH by hand, and a package directory is assembled the way the wheel
# lays it out: the old lepton_edge/ with the old agent/, converters/ and device_profiles/ inside it.
set -euo pipefail
here="$(cd "$(dirname "$0")/../../.." && pwd)"
old="$(cd "$1" && pwd)"; shift
pkg="$(mktemp -d /tmp/lepton-old-pkg.XXXXXX)"
trap 'rm -rf "$pkg"' EXIT
cp -r "$old/lepton_edge" "$pkg/"
for sub in agent converters device_profiles; do ln -sfn "$old/$sub" "$pkg/lepton_edge/$sub"; done
site="$("$here/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cd "$here"
PYTHONPATH="$pkg:$site:$here/tests" PYTHONSAFEPATH=1 "$here/.venv/bin/python" -S "$@"
