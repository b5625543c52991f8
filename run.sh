#!/usr/bin/env bash
# pdbus: ./run.sh setup | single-node | cross-node | test | bench  (see README.md)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
cd "$ROOT"

log() { printf '[run.sh] %s\n' "$*" >&2; }

have_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# Make sure .venv exists and holds what pdbus needs. Idempotent: a stamp of the inputs makes a
# second run take well under a second.
ensure_env() {
  local want stamp="$VENV/.pdbus-stamp"
  want="$(cat setup.cfg pyproject.toml run.sh | sha256sum | cut -c1-16)-$(have_cuda && echo gpu || echo cpu)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import pdbus, torch, zmq" 2>/dev/null; then
    return 0
  fi
  local base="${PYTHON:-python3}"
  if ! "$base" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    log "pdbus needs Python >= 3.11 (set PYTHON=...)"; exit 1
  fi
  if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    if have_cuda && "$base" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
      "$base" -m venv --system-site-packages "$VENV"   # keep the machine's CUDA torch
    else
      "$base" -m venv "$VENV"
    fi
  fi
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if have_cuda; then
      log "installing PyTorch (CUDA)"; "$PY" -m pip install -q torch
    else
      log "installing PyTorch 2.13.0 (CPU)"; "$PY" -m pip install -q torch==2.13.0
    fi
  fi
  # system libraries: libibverbs for Mooncake (rdma), iproute2 for the network-namespace tests
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    local missing=()
    ldconfig -p 2>/dev/null | grep -q libibverbs.so.1 || missing+=(libibverbs1)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if [[ ${#missing[@]} -gt 0 ]]; then
      log "apt-get install ${missing[*]}"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
        || log "could not install ${missing[*]} (rdma / namespace tests will skip)"
    fi
  fi
  local extras="test,bench"
  if have_cuda; then extras="$extras,gpu,rdma"; else extras="$extras,rdma-cpu"; fi
  log "installing pdbus[$extras] (editable)"
  # setuptools warns that folders named like the packages sit in the working directory: that is
  # the layout (module path = file path), so the warning says nothing here
  PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q -e ".[$extras]"
  # structured output (xgrammar): on a CPU host without the Triton it declares (about 1 GB; only
  # its GPU mask kernel uses it)
  if ! "$PY" -c "import xgrammar" 2>/dev/null; then
    log "installing xgrammar (structured output)"
    "$PY" -m pip install -q --no-deps "xgrammar==0.2.8" && "$PY" -m pip install -q "apache-tvm-ffi>=0.1.11" pydantic
  fi
  if have_cuda && ! "$PY" -c "import cupy" 2>/dev/null; then
    local cuda_major
    cuda_major="$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)"
    log "installing cupy-cuda${cuda_major:-12}x (CUDA IPC)"; "$PY" -m pip install -q "cupy-cuda${cuda_major:-12}x"
  fi
  if ! have_cuda; then  # the CPU path's compiled kernels (native/cpu): built once, cached by torch
    log "building the CPU kernels (native/cpu, once per machine)"
    "$PY" -c "from native.cpu import kernels; kernels()" || log "CPU kernels not built: the CPU path runs plain torch"
  fi
  echo "$want" > "$stamp"
}

usage() {
  cat <<'USAGE'
usage: ./run.sh COMMAND [ARGS]
  setup                 create .venv and install pdbus (idempotent)
  single-node [ARGS]    router + prefill + decode on this host, OpenAI API on :8109
                        (CPU: the built-in model; GPUs: conf/single-node.toml). Ctrl-C stops all.
  cross-node prefill --router-ip IP | cross-node decode --router-ip IP | cross-node demo
  test [PYTEST ARGS]    run the test suite
  bench [NAME]          run benchmarks (bench/README.md)
USAGE
}

cmd="${1:-}"; [[ $# -gt 0 ]] && shift
case "$cmd" in
  setup) ensure_env; log "ready: $VENV" ;;
  single-node) ensure_env; exec "$PY" -m pdbus.launch single-node "$@" ;;
  cross-node) ensure_env; exec "$PY" -m pdbus.launch cross-node "$@" ;;
  test)
    ensure_env
    exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
  bench) ensure_env; exec "$PY" -m pdbus.launch bench "$@" ;;
  ""|-h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
