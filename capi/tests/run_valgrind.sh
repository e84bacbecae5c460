#!/usr/bin/env bash
# Run a program (normally sd_capi_test) under valgrind memcheck the way tests/capi does:
#   capi/tests/run_valgrind.sh OUT.xml PROGRAM [ARGS...]
# PYTHONMALLOC=malloc sends every Python allocation through malloc, so memcheck sees
# real blocks instead of pymalloc's arenas (whose address_in_range probe reads memory it
# does not own, by design). valgrind-python.supp (beside this script) silences what
# CPython and ONNX Runtime report about themselves; tests/capi/test_capi_memory.py then
# fails on any remaining error with a frame in capi/src or capi/tests.
# --child-silent-after-fork: a forked child's status would otherwise land after the XML
# document and make it unreadable (seen once the C test opened a pipeline with backend auto).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
xml="$1"
shift
export PYTHONMALLOC=malloc
exec valgrind --tool=memcheck --xml=yes --xml-file="$xml" --child-silent-after-fork=yes --num-callers=40 \
  --suppressions="$here/valgrind-python.supp" \
  --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
  --error-exitcode=0 "$@"
