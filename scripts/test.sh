#!/usr/bin/env bash
# Runs the compiled tests (dist/test/unit, dist/test/integration) after sweeping stale test domains and users: two files at a time,
# then those that stop the system libvirtd one at a time; exits non-zero if either run failed, 1 if no test file.
#
# Usage: scripts/test.sh [FILTER...] [NODE_TEST_OPTION...]
#   FILTER is a test file (test/x.test.ts or dist/test/x.test.js) or a substring of its path; options (starting
#   with -) go to `node --test` as they are, so give their values with '=' (--test-name-pattern=backup).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shopt -s nullglob

all_files=(dist/test/unit/*.test.js dist/test/integration/*.test.js)
options=()
filters=()
for arg in "$@"; do
  case "$arg" in
    -*) options+=("$arg") ;;
    *) filters+=("$arg") ;;
  esac
done

files=()
if [ "${#filters[@]}" -eq 0 ]; then
  files=("${all_files[@]}")
else
  for filter in "${filters[@]}"; do
    # A source path names its compiled twin.
    compiled=$filter
    if [[ "$filter" == *.ts ]]; then
      compiled="dist/${filter%.ts}.js"
    fi
    if [ -f "$compiled" ]; then
      files+=("$compiled")
      continue
    fi
    matched=0
    for file in "${all_files[@]}"; do
      if [[ "$file" == *"$filter"* ]]; then
        files+=("$file")
        matched=1
      fi
    done
    [ "$matched" -eq 1 ] || { echo "test: no test file matches '$filter'" >&2; exit 1; }
  done
fi

if [ "${#files[@]}" -eq 0 ]; then
  echo "test: no test files under dist/test/unit or dist/test/integration (did the build run?)" >&2
  exit 1
fi

node dist/test/support/sweep.js

# Files that stop the system libvirtd (killed, or swapped for one that asks for a login) or assert on its log run
# alone, after the others, which run two at a time: each owns its domains, dirs, sockets and ports.
exclusive=()
shared=()
for file in "${files[@]}"; do
  case "$(basename "$file")" in
    failures.test.js | switches.test.js) exclusive+=("$file") ;;
    *) shared+=("$file") ;;
  esac
done

# The commands run with 8 libuv threads (bin/launch.cjs); tests that use the engine in-process get as many, so
# that one pool thread held by a blocking NBD call cannot starve the rest as Node's default 4 might. A test file
# that hangs is cancelled after 10 minutes (Node 20 times the file, not each test), where the run would wait for ever.
export UV_THREADPOOL_SIZE="${UV_THREADPOOL_SIZE:-8}"
timeout=(--test-timeout=600000)
status=0
if [ "${#shared[@]}" -gt 0 ]; then
  node --test --test-reporter=spec --test-concurrency=2 "${timeout[@]}" "${options[@]}" "${shared[@]}" || status=$?
fi
if [ "${#exclusive[@]}" -gt 0 ]; then
  node --test --test-reporter=spec --test-concurrency=1 "${timeout[@]}" "${options[@]}" "${exclusive[@]}" || status=$?
fi
exit "$status"
