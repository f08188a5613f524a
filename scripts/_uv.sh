# Sourced by the scripts: $root, $python, and $uv, a uv to install with.
#
# The uv on the PATH, or else one installed on first use from PyPI into .tools/ (ignored by
# git), so a machine with only Python 3.11+ needs nothing else.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
UV_VERSION="0.13.9" # the private uv's version (a uv on the PATH is used as it is)

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "gql-service needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

# Run a long command (an install) so that a stop signal sent to this script stops it at once.
# bash waits for a foreground command before it acts on a SIGINT sent to its own pid (not
# the group): the install ran to its end and the service started anyway. So the command
# runs in the background, and `wait` returns at the signal. (A background command ignores
# SIGINT in a script: it is stopped with SIGTERM.)
interruptible() {
  "$@" &
  _child=$!
  trap '_stop_child; echo "interrupted" >&2; exit 130' INT
  trap '_stop_child; exit 143' TERM
  _status=0
  wait "$_child" || _status=$?
  trap - INT TERM
  return "$_status"
}
_stop_child() {
  kill -TERM "$_child" 2>/dev/null || true
  wait "$_child" 2>/dev/null || true
}

uv="$(command -v uv || true)"
if [ -z "$uv" ]; then
  tools="$root/.tools/uv-$UV_VERSION"
  uv="$tools/bin/uv"
  if [ ! -x "$uv" ]; then
    echo "installing uv $UV_VERSION into .tools/ from PyPI (once)" >&2
    installer="$python"
    if ! "$installer" -m pip --version >/dev/null 2>&1; then
      # A Python without pip: a throwaway venv has one (ensurepip).
      "$python" -m venv "$root/.tools/pip" && installer="$root/.tools/pip/bin/python"
    fi
    mkdir -p "$root/.tools"
    if ! interruptible "$installer" -m pip install --disable-pip-version-check --quiet --target "$tools" \
      "uv==$UV_VERSION" >"$root/.tools/install.log" 2>&1; then
      cat "$root/.tools/install.log" >&2
      echo "could not install uv (log: .tools/install.log)" >&2
      exit 1
    fi
  fi
fi
# The interpreter itself, not the name it was found by: a pyenv shim (or any wrapper) looks
# like another Python to uv each time, and uv then removes and remakes .venv on every command.
export UV_PYTHON="$("$python" -c 'import sys; print(sys.executable)')"
export UV_PYTHON_DOWNLOADS=never # the machine's Python, never one uv would fetch
