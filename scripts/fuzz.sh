#!/usr/bin/env bash
# Coverage-guided fuzzing (AFL++ through cargo-afl, stable Rust) of the parsers that read
# client and upstream input. Installs cargo-afl and its AFL++ runtime when missing
# (idempotent), builds fuzz/ (outside the workspace, own target dir), then fuzzes each
# target for FUZZ_SECONDS from the checked-in corpus in fuzz/corpus/<target>/ and fails
# if any crash or hang is found.
#
#   bash scripts/fuzz.sh                      # short bounded run (test.sh)
#   FUZZ_SECONDS=600 bash scripts/fuzz.sh     # the longer run recorded in docs/fuzzing.md
#   FUZZ_TARGETS="range path" bash scripts/fuzz.sh
#
# Output (queue, crashes) goes to FUZZ_OUT (default: a fresh temp dir, kept on failure).
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-15}
FUZZ_TARGETS=${FUZZ_TARGETS:-path range challenge token_request authorization htpasswd jwt manifest_refs config}
AFL_VERSION=0.18.2

if ! cargo afl --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-afl $AFL_VERSION"
  cargo install --locked --version "$AFL_VERSION" cargo-afl
fi
# The AFL++ runtime is built once per rustc version under ~/.local/share/afl.rs.
rt_dir="${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs/rustc-$(rustc -V | awk '{print $2}')-"*
# shellcheck disable=SC2086
if ! compgen -G "$rt_dir/afl.rs-*/afl/bin/afl-fuzz" >/dev/null; then
  echo "fuzz: building the AFL++ runtime (once)"
  cargo afl config --build
fi

echo "fuzz: building targets"
# Its own target dir even when the caller exports one: the instrumented build must not
# replace the workspace's artifacts, and the binaries are run from fuzz/target below.
export CARGO_TARGET_DIR="$PWD/fuzz/target"
(cd fuzz && cargo afl build --release --quiet)

out=${FUZZ_OUT:-$(mktemp -d /tmp/registry-fuzz.XXXXXX)}
# No UI, no CPU-governor or core_pattern demands (containers cannot change them), and a
# fixed per-exec timeout so a hang counts.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
  AFL_NO_AFFINITY=1 AFL_QUIET=1 AFL_SHUFFLE_QUEUE=0
# The config target parses flags: variables that fill flags must not leak in.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^REGISTRY_PROXY_' || true)
tmp_root=${TMPDIR:-/tmp}
failed=0
for t in $FUZZ_TARGETS; do
  mkdir -p "$out/$t"
  cargo afl fuzz -V "$FUZZ_SECONDS" -t 1000 -i "fuzz/corpus/$t" -o "$out/$t" \
    "fuzz/target/release/$t" >"$out/$t.log" 2>&1 || {
    echo "fuzz: afl-fuzz failed for $t:" >&2
    tail -20 "$out/$t.log" >&2
    failed=1
    continue
  }
  stats="$out/$t/default/fuzzer_stats"
  execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats")
  paths=$(awk -F': *' '/^corpus_count/ {print $2}' "$stats")
  crashes=$(find "$out/$t/default/crashes" -type f ! -name README.txt | wc -l)
  hangs=$(find "$out/$t/default/hangs" -type f | wc -l)
  printf 'fuzz: %-14s %9s execs  %5s corpus  %s crashes  %s hangs\n' "$t" "$execs" "$paths" "$crashes" "$hangs"
  if ((crashes + hangs > 0)); then
    failed=1
    find "$out/$t/default/crashes" "$out/$t/default/hangs" -type f ! -name README.txt | head -5 >&2
  fi
done
rm -rf "$tmp_root/registry-fuzz-config"
if ((failed)); then
  echo "fuzz: FAILED (inputs kept in $out)" >&2
  exit 1
fi
[[ -n ${FUZZ_OUT:-} ]] || rm -rf "$out"
echo "fuzz: no crashes"
