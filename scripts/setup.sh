#!/usr/bin/env bash
# One-time (idempotent) set-up for a fresh machine: system packages, virtualenv, the package.
#   Linux (Debian/Ubuntu): redis-server and OpenBLAS via apt-get (no PyPI package ships an
#   unprefixed cblas for MLX, nor a Redis server), and chromium + chromium-driver for the
#   dashboard's browser test (Debian's own browser: nothing downloads one); macOS: redis via Homebrew.
# Re-running is cheap: pip is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${KD_PYTHON:-python3}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo "$@";
  else say "need root for: $*  (run it yourself, then re-run this script)"; return 1; fi
}

case "$(uname -s)" in
  Linux)
    if command -v apt-get >/dev/null 2>&1; then
      missing=()
      for pkg in redis-server libopenblas0-pthread chromium chromium-driver; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
      done
      "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
      if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
      fi
    else
      command -v redis-server >/dev/null 2>&1 || say "WARNING: install redis-server with your package manager"
      say "NOTE: install chromium and its chromedriver for the dashboard's browser test (it is skipped without them)"
      say "NOTE: install OpenBLAS (libopenblas) for fast CPU matmuls; see README 'Linux notes'"
    fi
    ;;
  Darwin)
    if ! command -v redis-server >/dev/null 2>&1; then
      if command -v brew >/dev/null 2>&1; then say "brew install redis"; brew install redis;
      else say "WARNING: install Homebrew (https://brew.sh) and run 'brew install redis'"; fi
    fi
    say "NOTE: the dashboard's browser test needs Debian's chromium + chromium-driver; on macOS it is skipped"
    ;;
esac

"$PYTHON" - <<'PY' || { say "Python >= 3.11 is required (set KD_PYTHON=/path/to/python3.11)"; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.kd-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | cksum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing kd-daemon and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
  echo "$want" > "$stamp"
fi
say "ready ($("$VENV/bin/python" --version), $VENV)"
