# Sourced by scripts/run, scripts/test and scripts/bench: bring .venv to what uv.lock says,
# then return with $root, $venv and $uv set.
#
# The environment is synced from uv.lock as committed (--locked: a lock that disagrees with
# pyproject.toml stops here, it is never re-resolved behind your back), and without
# removing what another command added (--inexact): ./scripts/run, ./scripts/test and
# ./scripts/bench share one .venv and never reinstall each other's packages.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
venv="$root/.venv"
wanted="${1:-}" # extras this command needs, comma-separated ("" for none)
export UV_PROJECT_ENVIRONMENT="$venv"
extras=()
for extra in ${wanted//,/ }; do
  extras+=(--extra "$extra")
done
# The tests start dozens of processes, two test files at a time from the first second:
# their bytecode is compiled here once, in parallel, not by every process at once (a fresh
# clone's first API took over 60 s to answer on CI while they all compiled the same files).
case ",$wanted," in *,test,*) extras+=(--compile-bytecode) ;; esac
if ! interruptible "$uv" sync --locked --inexact "${extras[@]}"; then
  echo "the environment could not be synced from uv.lock (above). If pyproject.toml changed," >&2
  echo "refresh the lock with ./scripts/upgrade (or \`uv lock\`) and commit uv.lock with it." >&2
  exit 1
fi
