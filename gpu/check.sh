#!/usr/bin/env bash
# GPU proof kit (`make gpu-check`): one run of at most 8 minutes on a GPU machine with its own
# python3 and torch (no venv, no package registry). In order, each step with a time limit of its
# own and all within one budget, so that one hang cannot eat the run:
#   machine   what the run has (device, torch, nvcc, compute-sanitizer, ninja, hypothesis, ...)
#   build     provcollate._C in place for sm_90 on all cores (gpu/build.py), then loaded and checked
#   pytest    every CUDA test: tests/test_cuda_ops.py and the CUDA cases of the op, Recorder and
#             Collator suites (-k cuda); a skip for want of a device or the extension is a failure
#   smoke     each kernel against reference.py, then the whole path with host syncs forbidden
#   bert      a BertModel from a config: DataLoader(workers, pin_memory), padded and packed, per token
#   bench     ops vs peers vs a device-to-device copy, Recorder.add vs compute (CUDA events)
#   memcheck / racecheck   compute-sanitizer over gpu/smoke.py (racecheck: the kernels alone)
# Writes a log and benchmarks/results/gpu.md (copies into $OUT when set) and prints a table last;
# exits non-zero if any step failed, timed out or was not reached.
#
# The GPU machine may lack hypothesis (which the test suites import) and ninja: the dry
# run gathers both into build/gpu-deps, which must travel with the tree (run's carry=["build/gpu-deps"]).
# Without it the pytest step runs tests/test_cuda_ops.py alone, and says so (and fails). On the
# day: `make gpu-check DRY_RUN=1` here, then run(command="make gpu-check", carry=["build/gpu-deps"],
# timeout_s=540), then commit the gpu.md that comes back in $OUT as benchmarks/results/gpu.md.
#
# DRY_RUN=1 runs the same plumbing on a CPU machine with this checkout's venv and extension, which
# `make gpu-check DRY_RUN=1` first sets up as `make test` does (a fresh clone needs nothing else):
# the steps that need a device are skipped and say so; its page goes to $OUT (or a temporary
# folder), never to benchmarks/results/.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${GPU_PYTHON:-python3}
dry=${DRY_RUN:-0}
budget=${GPU_CHECK_BUDGET_S:-465}  # seconds all steps share; the page is written after them
deps=$root/build/gpu-deps
if [ "$dry" = 1 ]; then
    dest=${OUT:-$(mktemp -d)}
    page=$dest/gpu-dry-run.md
    log=$dest/gpu-check.log
else
    dest=${OUT:-}
    page=$root/benchmarks/results/gpu.md
    log=$root/benchmarks/results/gpu-check.log
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$page")"
: >"$log"
table=$work/table
: >"$table"
failed=0
built=1
start=$SECONDS
# The tree's provcollate, whatever this interpreter has installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

row() { echo "| $1 | $2 | $3 | $4 |" >>"$table"; }
skip() { row "$1" "skipped: $2" - -; echo "=== $1: skipped ($2)" >>"$log"; }
fail_skip() { row "$1" "NOT RUN: $2" - -; echo "=== $1: not run ($2)" >>"$log"; failed=1; }

# step NAME LIMIT CMD...: run CMD for at most LIMIT seconds (less if the budget is nearly spent);
# its output goes to the log and its last line to the table.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((budget - (SECONDS - start))) t0=$SECONDS rc out=$work/step.out
    if [ "$left" -lt 15 ]; then fail_skip "$name" "the ${budget} s budget was spent"; return 1; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit} s): $*" >>"$log"
    timeout -k 10 "$limit" "$@" >"$out" 2>&1
    rc=$?
    cat "$out" >>"$log"
    local said
    said=$(grep -v '^[[:space:]]*$' "$out" | tail -n 1 | cut -c1-160 | tr '|' '/')
    if [ "$rc" = 0 ]; then
        row "$name" pass "$((SECONDS - t0)) s" "$said"
        return 0
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        row "$name" "FAIL: timed out" "$((SECONDS - t0)) s" "$said"
    else
        row "$name" "FAIL: exit $rc" "$((SECONDS - t0)) s" "$said"
    fi
    { echo "#### $name (exit $rc), last lines"; echo; echo '```'; tail -n 25 "$out"; echo '```'; echo; } >>"$work/failures"
    failed=1
    return 1
}

describe_tree() {
    if ! commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null); then echo "a tree without git history"; return; fi
    if git -C "$root" diff --quiet HEAD -- 2>/dev/null; then echo "commit $commit"; else echo "commit $commit with local changes"; fi
}
machine_facts() { { echo "## Machine"; echo; grep '^- ' "$work/step.out"; } >"$work/machine"; }

# A device step: not run, and a failure, without a working build.
device_step() {
    if [ "$built" = 1 ]; then step "$@"; else fail_skip "$1" "no working build"; fi
}

# What the machine lacks, from build/gpu-deps when it travelled here.
if ! "$py" -c 'import hypothesis' >/dev/null 2>&1 && [ -d "$deps" ] && [ "$dry" != 1 ]; then
    export PYTHONPATH="$PYTHONPATH:$deps"
fi
if ! ninja --version >/dev/null 2>&1 && [ -x "$deps/bin/ninja" ] && "$deps/bin/ninja" --version >/dev/null 2>&1; then
    export PATH="$deps/bin:$PATH"
fi
# torch takes CUDA_HOME from nvcc's path when unset; an nvcc that is a link or a wrapper in
# /usr/local/bin would make it /usr/local, where libcudart is not: take a toolkit that has it.
if [ -z "${CUDA_HOME:-}" ]; then
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    for candidate in "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" /usr/local/cuda; do
        if [ -x "$candidate/bin/nvcc" ] && ls "$candidate"/lib64/libcudart.so* >/dev/null 2>&1; then
            CUDA_HOME=$candidate
            break
        fi
    done
fi
[ -n "${CUDA_HOME:-}" ] && export CUDA_HOME
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")

tests=(tests/test_cuda_ops.py tests/test_ops.py tests/test_record.py tests/test_collate.py)
if "$py" -c 'import hypothesis' >/dev/null 2>&1; then
    pytest_args=(-k cuda "${tests[@]}")
    pytest_note=""
else  # tests/conftest.py and the other suites import hypothesis: the CUDA file runs alone
    pytest_args=(--noconftest tests/test_cuda_ops.py)
    pytest_note="no hypothesis here and build/gpu-deps did not travel: the CUDA cases of ${tests[*]:1} did not run"
fi

if [ "$dry" = 1 ]; then
    step machine 60 "$py" gpu/env.py cpu
    machine_facts
    step "gpu-deps (for the carry)" 60 "$py" gpu/deps.py "$deps"
    skip build "dry run: an in-place build would replace the extension this checkout's venv loads"
    step "pytest (collects; CUDA tests skip)" 120 "$py" -m pytest -q -p no:cacheprovider "${pytest_args[@]}"
    step "smoke (cpu)" 90 "$py" gpu/smoke.py cpu
    step "bert end to end (cpu)" 120 "$py" gpu/bert_e2e.py cpu
    step "bench (cpu, tiny)" 120 "$py" gpu/bench.py cpu "$work/bench.md"
    skip "compute-sanitizer memcheck" "dry run, no device"
    skip "compute-sanitizer racecheck" "dry run, no device"
else
    step machine 60 "$py" gpu/env.py cuda || built=0
    machine_facts
    if [ "$built" = 1 ]; then
        step build 300 env PROVCOLLATE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$py" gpu/build.py || built=0
    else
        fail_skip build "the machine cannot build or run CUDA code"
    fi
    device_step "pytest (cuda)" 180 env PYTHONPATH="$PYTHONPATH:$root/gpu" \
        "$py" -m pytest -q -p no:cacheprovider -p pytest_strict "${pytest_args[@]}"
    if [ -n "$pytest_note" ]; then row "pytest: the suites that import hypothesis" "NOT RUN" - "$pytest_note"; failed=1; fi
    device_step "smoke (cuda, no host sync)" 90 "$py" gpu/smoke.py cuda
    device_step "bert end to end (cuda)" 120 "$py" gpu/bert_e2e.py cuda
    device_step "bench (cuda events)" 180 "$py" gpu/bench.py cuda "$work/bench.md"
    # Without the caching allocator every tensor is its own allocation, so memcheck sees any
    # access past a tensor's end, not only past the end of a cached block.
    device_step "compute-sanitizer memcheck" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
        --error-exitcode 1 --report-api-errors no "$py" gpu/smoke.py cuda --sanitizer
    device_step "compute-sanitizer racecheck" 120 "$sanitizer" --tool racecheck --error-exitcode 1 \
        --report-api-errors no "$py" gpu/smoke.py cuda --kernels-only
fi

{
    if [ "$dry" = 1 ]; then echo "# GPU proof kit: DRY RUN on a CPU machine (not GPU numbers)"; else echo "# GPU proof kit: results"; fi
    echo
    echo "Written by \`make gpu-check$([ "$dry" = 1 ] && echo " DRY_RUN=1")\` on $(date -u +%Y-%m-%dT%H:%MZ) in $((SECONDS - start)) s; $(describe_tree). Log: \`$(basename "$log")\`."
    echo
    echo "| step | outcome | time | last line of its output |"
    echo "|---|---|---:|---|"
    cat "$table"
    if [ -f "$work/machine" ]; then echo; cat "$work/machine"; fi
    if [ -f "$work/failures" ]; then echo; echo "## Failures"; echo; cat "$work/failures"; fi
    if [ -f "$work/bench.md" ]; then echo; echo "## Speed"; echo; cat "$work/bench.md"; fi
} >"$page"
if [ -n "$dest" ] && [ "$dry" != 1 ]; then mkdir -p "$dest" && cp "$log" "$page" "$dest/"; fi
if [ -f "$work/failures" ]; then cat "$work/failures"; fi
echo "log: $log"
echo "page: $page"
echo "| step | outcome | time | last line of its output |"
cat "$table"
exit $failed
