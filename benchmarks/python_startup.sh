#!/usr/bin/env bash
# Where the ~15 s of every run that no code of ours runs in goes: Python start-ups on the GPU node.
# DeepSpeed's launcher imports deepspeed (and torch) twice before a rank starts, and the rank imports
# torch again. This measures, three times each, in fresh interpreters:
#   - `import torch`, `import deepspeed`, and `deepspeed --help` (the launcher's own start-up)
#   - the same with PYTHONPYCACHEPREFIX pointing at a writable folder and bytecode writing on, in
#     case the node's site-packages holds no bytecode caches (then every import compiles every
#     module again)
#   - whether bytecode writing is off, whether torch's folders hold __pycache__ and are writable
#   - `python3 -X importtime -c "import deepspeed"`: the modules with the largest cumulative times
# Prints a short table last; the raw output goes to $OUT/python_startup.txt.
#
#   bash benchmarks/python_startup.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/startup_out}
mkdir -p "$OUT"
RAW=$OUT/python_startup.txt
exec > >(tee "$RAW") 2>&1

echo "## provenance"
date -u +%FT%TZ
echo "commit ${VIRNUC_DS_COMMIT:-$(git rev-parse HEAD 2> /dev/null)}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null | head -1
echo "cpus $(nproc)"
python3 -c "import sys, torch, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2> /dev/null

echo "## bytecode"
env | grep -E '^PYTHON' | sort
python3 - << 'EOF'
import os, sys, importlib.util
print("dont_write_bytecode", sys.flags.dont_write_bytecode, "pycache_prefix", sys.pycache_prefix)
for name in ("torch", "deepspeed", "numpy"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(name, "not found"); continue
    folder = os.path.dirname(spec.origin)
    cache = os.path.join(folder, "__pycache__")
    pycs = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    pys = len([f for f in os.listdir(folder) if f.endswith(".py")])
    print(f"{name}: {folder} writable={os.access(folder, os.W_OK)} .py={pys} __pycache__ entries={pycs}")
EOF

# seconds of a command, wall clock
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > /dev/null 2>&1
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}

declare -A RESULT
measure() {  # label, command...
    local label=$1; shift
    local times=()
    for _ in 1 2 3; do times+=("$(seconds "$@")"); done
    RESULT[$label]="${times[*]}"
    echo "$label: ${times[*]}"
}

echo "## start-up times (s), three fresh interpreters each"
measure "python3 -c pass" python3 -c pass
measure "import torch" python3 -c "import torch"
measure "import deepspeed" python3 -c "import deepspeed"
measure "deepspeed --help" deepspeed --help
# the node's image may set PYTHONDONTWRITEBYTECODE=1: caches are then read but never written
export PYTHONPYCACHEPREFIX=/tmp/virnuc_pycache
unset PYTHONDONTWRITEBYTECODE
echo "populating the cache prefix: $(seconds python3 -c 'import deepspeed') s, $(seconds deepspeed --help) s"
measure "import torch, cache prefix" python3 -c "import torch"
measure "import deepspeed, cache prefix" python3 -c "import deepspeed"
measure "deepspeed --help, cache prefix" deepspeed --help
unset PYTHONPYCACHEPREFIX

echo "## python3 -X importtime -c 'import deepspeed': largest cumulative (us), top 40"
python3 -X importtime -c "import deepspeed" 2>&1 >/dev/null \
    | awk -F'|' 'NR > 1 {gsub(/ /, "", $2); print $2 "\t" $1 "\t" $3}' | sort -rn | head -40

echo "## table: seconds, three runs each"
for label in "python3 -c pass" "import torch" "import torch, cache prefix" "import deepspeed" \
             "import deepspeed, cache prefix" "deepspeed --help" "deepspeed --help, cache prefix"; do
    printf '%-32s %s\n' "$label" "${RESULT[$label]}"
done
