#!/usr/bin/env bash
# Give sslyze an environment of its own: .venv-sslyze/ at the repository root.
#
# sslyze pins its own `cryptography` (and ships nassl, its own OpenSSL build), which must not
# meet the project's .venv. tests/net/test_tls_scan.py runs .venv-sslyze/bin/sslyze and is
# skipped when it is missing. Safe to run again: it does nothing once the pinned version is in.
#
#   PYTHON=python3.11 bash tests/net/sslyze_env.sh
set -euo pipefail

SSLYZE_VERSION=6.3.1 # checks against Mozilla's guidelines 5.7, as villaged.net.tls follows
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.venv-sslyze"
stamp="$venv/.installed-sslyze-$SSLYZE_VERSION"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [[ -f "$stamp" && -x "$venv/bin/sslyze" ]]; then
    exit 0
fi
test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "sslyze==$SSLYZE_VERSION"
"$venv/bin/sslyze" --help >/dev/null
touch "$stamp"
