#!/usr/bin/env bash
# Summarises the lines that tests on real assets or a device append to $BASIN_TEST_LOG
# (lm/src/testkit.rs; kernels/tests/pass_ops.rs writes the same format):
# how many such tests ran, and which were skipped and why. A test counts as skipped when
# any of its lookups was.
set -euo pipefail
log="$1"
[ -s "$log" ] || { echo "tests on real assets and devices: none reported"; exit 0; }
awk -F'\t' '
    { seen[$2] = 1 }
    $1 == "skipped" { skipped[$2] = 1; why[$2 ": " $3] = 1 }
    END {
        ran = 0; n = 0
        for (t in seen) { if (t in skipped) n++; else ran++ }
        printf "tests on real assets and devices: %d ran, %d skipped\n", ran, n
        for (w in why) print "  SKIPPED " w | "sort"
    }' "$log"
