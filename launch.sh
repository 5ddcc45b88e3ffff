#!/usr/bin/env bash
# PixelHDM Studio launcher (Linux, macOS).
#   ./launch.sh [app flags]          create .venv on first run, install requirements, start
#   ./launch.sh test [pytest args]   also install requirements-dev.txt, run ruff check, then the
#                                    test suite (-m "not slow" skips the subprocess-heavy tests)
#   ./launch.sh doctor               print what this machine offers (changes nothing)
# A requirements file is installed again only when it changes: its SHA-256 is stamped inside
# .venv after a successful install, so an interrupted install is redone on the next start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=".venv"
VPY="$VENV/bin/python"
PY_VERSION='import sys; print("%d.%d" % sys.version_info[:2])'
# The Python versions every pinned requirement has wheels for (a test resolves them all).
PY_MIN=11
PY_MAX=14
PY_OK="import sys; sys.exit(not (3, $PY_MIN) <= sys.version_info[:2] <= (3, $PY_MAX))"

die() { printf 'launch.sh: %s\n' "$*" >&2; exit 1; }

# Print the first Python from 3.11 to 3.14 in this order. Names that exist but do not run
# (pyenv shims of versions that are not selected) are skipped.
find_python() {
    local cand ver found=""
    for cand in python3.13 python3.12 python3.11 python3.14 python3 python; do
        command -v "$cand" >/dev/null 2>&1 || continue
        ver=$("$cand" -c "$PY_VERSION" 2>/dev/null) || continue
        if "$cand" -c "$PY_OK" 2>/dev/null; then
            printf '%s\n' "$cand"
            return 0
        fi
        found="$found $cand ($ver)"
    done
    if [ -n "$found" ]; then
        echo "launch.sh: PixelHDM Studio needs Python 3.$PY_MIN to 3.$PY_MAX; found only:$found." >&2
    else
        echo "launch.sh: no Python found (tried python3.13 ... python3.11, python3.14, python3, python)." >&2
    fi
    cat >&2 <<'EOF'
  Install Python 3.12 (any of 3.11 to 3.14 works), then run ./launch.sh again:
    Ubuntu 24.04, Debian 12:   sudo apt install python3 python3-venv
    Ubuntu 22.04 (ships 3.10): sudo apt install python3.11 python3.11-venv
    Fedora:                    sudo dnf install python3.12
    macOS:                     brew install python@3.12
    other systems:             https://www.python.org/downloads/
EOF
    return 1
}

make_venv() {
    local py
    py=$(find_python) || exit 1
    if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        die "$py has no 'venv'/'ensurepip' module. On Debian/Ubuntu install it with
    sudo apt install python3-venv      (or python$("$py" -c "$PY_VERSION")-venv)
and run ./launch.sh again."
    fi
    echo "Creating $VENV with $py ($("$py" -V 2>&1))"
    if ! "$py" -m venv "$VENV"; then
        rm -rf "$VENV"
        die "could not create $VENV with $py (see above; Debian/Ubuntu: apt install python3-venv)."
    fi
}

file_hash() {
    "$VPY" -c 'import hashlib, sys
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

# install_once FILE: pip install -r FILE unless .venv holds a stamp with the current hash of
# FILE and constraints.txt.
install_once() {
    local req="$1" stamp="$VENV/.stamp-$1.sha256" want
    want=$(file_hash "$req")
    # the pinned versions of everything pulled in count too
    if [ -f constraints.txt ]; then want="$want $(file_hash constraints.txt)"; fi
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "Installing $req into $VENV ..."
    rm -f "$stamp"
    "$VPY" -m pip install --disable-pip-version-check -r "$req" \
        || die "pip could not install $req (see the error above); fix that and start again."
    printf '%s\n' "$want" >"$stamp"
}

doctor() {
    local py="$VPY"
    "$py" -c '' >/dev/null 2>&1 || py=$(find_python) || exit 1
    "$py" engine/doctor.py
}

export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
mode="${1:-}"
if [ "$mode" = "doctor" ]; then
    doctor
    exit 0
fi

if ! "$VPY" -c '' >/dev/null 2>&1; then
    [ -e "$VENV" ] && echo "$VENV exists but its Python does not run; creating it again."
    rm -rf "$VENV"
    make_venv
elif ! "$VPY" -c "$PY_OK" 2>/dev/null; then
    echo "$VENV was made with Python $("$VPY" -c "$PY_VERSION"); PixelHDM Studio needs" \
         "3.$PY_MIN to 3.$PY_MAX, so it is created again."
    rm -rf "$VENV"
    make_venv
fi
install_once requirements.txt

if [ "$mode" = "test" ]; then
    shift
    install_once requirements-dev.txt
    mkdir -p test-output
    export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PIXELHDM_TEST_OUTPUT="$PWD/test-output"
    # the lint settings live in pyproject.toml; a finding stops the run before any test
    "$VPY" -m ruff check . \
        || die "ruff check found the problems above; fix them ($VPY -m ruff check --fix" \
               "fixes many), then run the tests again."
    exec "$VPY" -m pytest "$@"
fi
exec "$VPY" app.py "$@"
