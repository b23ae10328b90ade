#!/usr/bin/env bash
# One-time (idempotent) set-up for a fresh machine: system packages, virtualenv, the package.
#   Linux (Debian/Ubuntu): redis-server and OpenBLAS via apt-get (no PyPI package ships an
#   unprefixed cblas for MLX, nor a Redis server), and chromium + chromium-driver for the
#   dashboard's browser test (Debian's own browser: nothing downloads one); macOS: redis via Homebrew.
# Re-running is cheap: pip is skipped while pyproject.toml is unchanged.
#
#   scripts/setup.sh --check   only decide (platform, Python) and print the decision; change nothing.
#
# On a Mac, MLX has wheels only for native arm64 Python on macOS 14 or later: anything else is refused
# with its cause. The stock python3 there is 3.9, so Homebrew's python3.13/3.12/3.11 are preferred,
# with brew found at /opt/homebrew/bin even when it is not on PATH (KD_HOMEBREW_PREFIX overrides that
# location). KD_PYTHON=/path/to/python3.11 picks the interpreter on any platform.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
HOMEBREW_PREFIX_GUESS=${KD_HOMEBREW_PREFIX:-/opt/homebrew}
MIN_MACOS=14
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
refuse() { say "cannot set up here: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo "$@";
  else say "need root for: $*  (run it yourself, then re-run this script)"; return 1; fi
}

# --- decisions --------------------------------------------------------------------------------
find_brew() {  # brew on PATH, else Homebrew's Apple-silicon prefix (a non-login shell may lack it)
  if command -v brew 2>/dev/null; then return 0; fi
  if [ -x "$HOMEBREW_PREFIX_GUESS/bin/brew" ]; then echo "$HOMEBREW_PREFIX_GUESS/bin/brew"; return 0; fi
  return 1
}

check_mac() {  # native arm64 on macOS >= 14, or a refusal naming the cause
  if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || true)" = "1" ]; then
    refuse "this shell runs under Rosetta 2 (x86_64 emulation), and MLX has no x86_64 macOS wheel. Open a" \
      "native terminal (arm64: 'arch' prints arm64) and use the arm64 Homebrew in /opt/homebrew"
  fi
  local arch version major
  arch=$(uname -m)
  if [ "$arch" != "arm64" ]; then
    refuse "this Mac is $arch: MLX needs Apple silicon (arm64); there is no MLX wheel for Intel Macs"
  fi
  version=$(sw_vers -productVersion)
  major=${version%%.*}
  if ! [ "$major" -ge "$MIN_MACOS" ] 2>/dev/null; then
    refuse "macOS $version: MLX needs macOS $MIN_MACOS (Sonoma) or later; update macOS"
  fi
}

pick_python_mac() {  # KD_PYTHON, else Homebrew's newest supported python, else python3
  if [ -n "${KD_PYTHON:-}" ]; then echo "$KD_PYTHON"; return 0; fi
  local brew prefix v
  if brew=$(find_brew) && prefix=$("$brew" --prefix); then
    for v in 3.13 3.12 3.11; do
      if [ -x "$prefix/bin/python$v" ]; then echo "$prefix/bin/python$v"; return 0; fi
    done
  fi
  echo python3
}

check_python() {  # $1: interpreter; $2: OS. >= 3.11, and a native arm64 build on macOS
  local info version machine
  info=$("$1" -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine())' 2>/dev/null) ||
    refuse "no Python at '$1': brew install python@3.12 (macOS) or apt-get install python3 (Linux), or set KD_PYTHON"
  read -r version machine <<<"$info"
  if ! [ "${version#3.}" -ge 11 ] 2>/dev/null || [ "${version%%.*}" != 3 ]; then
    refuse "$1 is Python $version; Python >= 3.11 is required: brew install python@3.12 (macOS), or set" \
      "KD_PYTHON=/path/to/python3.11"
  fi
  if [ "$2" = "Darwin" ] && [ "$machine" != "arm64" ]; then
    refuse "$1 is an $machine build (an Intel Homebrew in /usr/local?): MLX needs a native arm64 Python;" \
      "use /opt/homebrew/bin/python3.12 or set KD_PYTHON"
  fi
}

# --- actions ----------------------------------------------------------------------------------
install_system_packages() {  # $1: OS
  case "$1" in
    Linux)
      if command -v apt-get >/dev/null 2>&1; then
        local missing=() pkg
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
        say "NOTE: install chromium and its chromedriver for the dashboard's browser test (skipped without them)"
        say "NOTE: install OpenBLAS (libopenblas) for fast CPU matmuls; see README 'Linux notes'"
      fi
      ;;
    Darwin)
      local brew
      if ! command -v redis-server >/dev/null 2>&1; then
        if brew=$(find_brew); then say "brew install redis"; "$brew" install redis;
        else say "WARNING: install Homebrew (https://brew.sh) and run 'brew install redis'"; fi
      fi
      say "NOTE: the dashboard's browser test needs Debian's chromium + chromium-driver; on macOS it is skipped"
      ;;
  esac
}

install_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.kd-setup-stamp" want
  want=$(cat pyproject.toml scripts/setup.sh | cksum)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing kd-daemon and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
    echo "$want" > "$stamp"
  fi
  say "ready ($("$VENV/bin/python" --version), $VENV)"
}

main() {
  local os
  os=$(uname -s)
  if [ "$os" = "Darwin" ]; then
    check_mac
    PYTHON=$(pick_python_mac)
  else
    PYTHON=${KD_PYTHON:-python3}
  fi
  check_python "$PYTHON" "$os"
  if [ "${1:-}" = "--check" ]; then
    say "ok: $os $(uname -m), python $PYTHON"
    return 0
  fi
  install_system_packages "$os"
  install_venv
}

main "$@"
