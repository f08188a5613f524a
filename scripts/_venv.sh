# Sourced by scripts/run, scripts/test and scripts/bench: create or refresh .venv, then return.
#
# One environment serves every command: the extras a command asks for are added to those
# already installed, and the stamp records them all, so going from ./scripts/test to
# ./scripts/run and back reinstalls nothing. A change to pyproject.toml reinstalls once,
# with every extra recorded so far.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
wanted="${1:-}" # extras this command needs, comma-separated ("" for none)
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "gql-service needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
log="$venv/install.log"
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
  : >"$log"
  echo "  upgrading pip" >&2
  if ! "$venv/bin/python" -m pip install --upgrade pip >>"$log" 2>&1; then
    cat "$log" >&2
    echo "installation failed (log: $log)" >&2
    exit 1
  fi
fi
digest="$("$venv/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:16])' "$root/pyproject.toml")"
stamp="$venv/.installed-$digest" # its lines: the extras installed with this pyproject.toml

missing=""
for extra in ${wanted//,/ }; do
  if [ ! -f "$stamp" ] || ! grep -qx "$extra" "$stamp"; then
    missing="$missing $extra"
  fi
done
if [ ! -f "$stamp" ] || [ -n "$missing" ]; then
  # Everything installed before (under any pyproject.toml) stays: one venv for all commands.
  # (Stamps written before the extras were recorded inside name them: .installed-HASH-EXTRAS.)
  extras="$({
    cat "$venv"/.installed-* 2>/dev/null || true
    ls -A "$venv" | sed -n 's/^\.installed-[0-9a-f]*-\(.*\)$/\1/p' | grep -vx base || true
    tr ',' '\n' <<<"$wanted"
  } | grep -v '^$' | sort -u || true)"
  spec="$(paste -sd, - <<<"$extras")"
  echo "installing gql-service${spec:+[$spec]} into $venv (pip's log: $log)" >&2
  # pip prints no progress bar into a pipe: show a line per package it fetches instead.
  if ! PYTHONUNBUFFERED=1 "$venv/bin/python" -m pip install -e "$root${spec:+[$spec]}" 2>&1 |
    tee -a "$log" |
    awk '/^Collecting /{print "  collecting " $2; fflush()} /^Installing collected packages/{print "  installing the packages"; fflush()}' >&2; then
    tail -n 30 "$log" >&2
    echo "installation failed (log: $log)" >&2
    exit 1
  fi
  rm -f "$venv"/.installed-*
  printf '%s\n' "$extras" >"$stamp"
  echo "installed in $((SECONDS - started)) s" >&2
fi
