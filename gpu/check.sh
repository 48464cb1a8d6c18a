#!/usr/bin/env bash
# GPU proof kit (`make gpu-check`): build in place against the machine's python3 and torch for
# sm_90, run the CUDA tests, a smoke script (each kernel + the no-sync path) plain and under
# compute-sanitizer, a small BertModel end to end, and the device benchmark; write a log and a results page, print a table last.
# DRY_RUN=1 runs the same plumbing on a CPU machine, skips what needs a device and says so, and
# writes its page only to $OUT (or a temporary folder), never to benchmarks/results/.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${GPU_PYTHON:-python3}
dry=${DRY_RUN:-0}
if [ "$dry" = 1 ]; then
    dev=cpu
    dest=${OUT:-$(mktemp -d)}
    page=$dest/gpu-dry-run.md
else
    dev=cuda
    dest=${OUT:-}
    page=$root/benchmarks/results/gpu.md
fi
work=$(mktemp -d)
log=$(dirname "$page")/gpu-check.log
mkdir -p "$(dirname "$page")"
table=$work/table
: >"$table"
failed=0

# step NAME CMD...: run CMD into the log, at most 300 s and within the 8-minute budget all steps share.
step() {
    local name=$1; shift
    local t0=$SECONDS left=$((460 - SECONDS))
    if [ "$left" -le 10 ]; then skip "$name" "out of the 8-minute budget"; failed=1; return; fi
    echo "=== $name: $*" >>"$log"
    if timeout "$(( left < 300 ? left : 300 ))" "$@" >>"$log" 2>&1; then
        echo "| $name | pass | $((SECONDS - t0)) s |" >>"$table"
    else
        echo "| $name | FAIL | $((SECONDS - t0)) s |" >>"$table"
        failed=1
    fi
}
skip() { echo "| $1 | skipped: $2 | - |" >>"$table"; echo "=== $1: skipped ($2)" >>"$log"; }

if [ "$dry" = 1 ]; then
    skip build "dry run, no CUDA toolkit"
    skip "pytest -m cuda" "dry run, no device"
    skip "compute-sanitizer memcheck" "dry run, no device"
    skip "compute-sanitizer racecheck" "dry run, no device"
    step "smoke (cpu)" "$py" gpu/smoke.py cpu
    step "bert end to end (cpu)" "$py" gpu/bert_e2e.py cpu
    step "bench (cpu, tiny)" "$py" gpu/bench.py cpu "$work/bench.md"
else
    step build env PROVCOLLATE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
        "$py" setup.py build_ext --inplace
    step "pytest -m cuda" "$py" -m pytest -q -m cuda -p no:cacheprovider tests
    step "smoke (cuda, no host sync)" "$py" gpu/smoke.py cuda
    step "compute-sanitizer memcheck" compute-sanitizer --tool memcheck --error-exitcode 1 "$py" gpu/smoke.py cuda
    step "compute-sanitizer racecheck" compute-sanitizer --tool racecheck --error-exitcode 1 "$py" gpu/smoke.py cuda --kernels-only
    step "bert end to end (cuda)" "$py" gpu/bert_e2e.py cuda
    step "bench (cuda events)" "$py" gpu/bench.py cuda "$work/bench.md"
fi

{
    if [ "$dry" = 1 ]; then echo "# GPU proof kit: DRY RUN on a CPU machine (not GPU numbers)"; else echo "# GPU proof kit: results"; fi
    echo
    echo "Written by \`make gpu-check\` on $(date -u +%Y-%m-%dT%H:%MZ), $("$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1)."
    echo
    echo "| step | outcome | time |"
    echo "|---|---|---:|"
    cat "$table"
    if [ -f "$work/bench.md" ]; then echo; echo "## Speed (medians; GB/s of the real bytes read and written)"; echo; cat "$work/bench.md"; fi
} >"$page"
if [ -n "$dest" ] && [ "$dry" != 1 ]; then mkdir -p "$dest"; cp "$log" "$page" "$dest/"; fi
echo "log: $log"
echo "page: $page"
echo "| step | outcome | time |"
cat "$table"
exit $failed
