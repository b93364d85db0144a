#!/usr/bin/env bash
# Install Triton's perf_analyzer into a cache dir (no GPU required).
# Idempotent: a second run only re-checks the existing install and exits.
#
# Why this route: PyPI's `perf-analyzer` package is an empty placeholder; the
# real binary ships inside the tritonclient manylinux wheel, and 2.46.0 is the
# newest one whose binary runs on Debian 12's glibc 2.36.
set -euo pipefail

PA_HOME="${PERF_ANALYZER_HOME:-$HOME/.cache/canary-gateway/perf_analyzer}"
TRITONCLIENT_VERSION=2.46.0
# Any 12.x wheel ships libcudart.so.12; 12.4 is the CUDA line tritonclient 2.46 was built against.
CUDART_VERSION=12.4.127
BIN="$PA_HOME/bin/perf_analyzer"
LIB="$PA_HOME/lib"
# The stamp names the pins, so bumping a version above forces a reinstall.
STAMP="$PA_HOME/.installed-tritonclient-$TRITONCLIENT_VERSION-cudart-$CUDART_VERSION"
# libb64 is a runtime dep no wheel provides. libssl3/zlib1g are almost always
# present already (python/pip need them) but are listed so a minimal image works.
APT_PKGS=(libb64-0d libssl3 zlib1g)

log() { echo "install_perf_analyzer: $*" >&2; }

# Fail loudly unless every shared library resolves and the binary actually runs.
verify() {
  local out
  out="$(LD_LIBRARY_PATH="$LIB" ldd "$BIN")"
  if grep 'not found' <<<"$out" >&2; then log "unresolved shared libraries (above)"; return 1; fi
  # Use --version, not --help: 2.46's perf_analyzer rejects --help with exit 99.
  out="$(LD_LIBRARY_PATH="$LIB" "$BIN" --version 2>&1)" || { log "'$BIN --version' failed: $out"; return 1; }
  grep -q 'Perf Analyzer Version' <<<"$out" || { log "unexpected --version output: $out"; return 1; }
}

# Only hand apt the *missing* packages: naming an installed one (e.g. libssl3)
# makes apt upgrade it and its reverse deps, an unwanted side effect.
MISSING=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || MISSING+=("$p")
done
if [ "${#MISSING[@]}" -gt 0 ]; then  # skip apt entirely when satisfied: slow and needs root
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get install ${MISSING[*]}"
  # Refresh the package index only if the existing one can't satisfy the install.
  $SUDO apt-get install -y -q --no-install-recommends "${MISSING[@]}" >&2 \
    || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q --no-install-recommends "${MISSING[@]}" >&2; }
fi

if [ -f "$STAMP" ] && verify; then
  log "already installed at $PA_HOME"; exit 0
fi

log "installing into $PA_HOME"
rm -f "$PA_HOME"/.installed-*  # stamp is only re-created after a verified install
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --no-deps: we need two files out of these wheels, not a Python environment.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK" \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION" >&2

# A wheel is a zip; fall back to Python's zipfile when unzip isn't installed.
extract() {  # extract WHEEL DEST
  if command -v unzip >/dev/null; then unzip -q -o "$1" -d "$2"; else python3 -m zipfile -e "$1" "$2"; fi
}
extract "$WORK"/tritonclient-"$TRITONCLIENT_VERSION"-*.whl "$WORK/tc"
extract "$WORK"/nvidia_cuda_runtime_cu12-"$CUDART_VERSION"-*.whl "$WORK/cudart"

mkdir -p "$PA_HOME/bin" "$LIB"
install -m 755 "$WORK/tc/tritonclient-$TRITONCLIENT_VERSION.data/data/bin/perf_analyzer" "$BIN"  # zipfile drops +x
install -m 644 "$WORK/cudart/nvidia/cuda_runtime/lib/libcudart.so.12" "$LIB/"

verify || { log "install FAILED verification"; exit 1; }
touch "$STAMP"
log "installed perf_analyzer (tritonclient $TRITONCLIENT_VERSION, cudart $CUDART_VERSION) in $PA_HOME"
