#!/usr/bin/env bash
# Nightly spndi run over a (growing) beamtime, logging to a dated file.
#
#   spndi-nightly.sh MANIFEST [spndi run options...]
#   spndi-nightly.sh /data/lco-2024-07/beamtime.toml --cluster slurm
#
# Every stage skips what is up to date, so a night with no new data takes seconds; a second
# copy started while one still runs stops at once (<output>/.spndi.lock). The output of the run
# goes to $SPNDI_LOG_DIR/nightly-YYYY-MM-DD.log (default: ./logs beside the manifest); the exit
# code is spndi's (0 all done, 1 something failed or was skipped, 2 bad input or locked).
# Every value is passed quoted: paths with spaces or shell characters are safe.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 MANIFEST [spndi run options...]" >&2
    exit 2
fi
manifest=$1
shift
if [[ ! -f "$manifest" ]]; then
    echo "$0: manifest '$manifest' not found" >&2
    exit 2
fi
log_dir=${SPNDI_LOG_DIR:-"$(dirname -- "$manifest")/logs"}
mkdir -p -- "$log_dir"
log="$log_dir/nightly-$(date +%F).log"
spndi_bin=${SPNDI:-spndi}

{
    echo "=== $(date --iso-8601=seconds) spndi run $manifest $* (host $(hostname))"
    status=0
    "$spndi_bin" run "$manifest" "$@" || status=$?
    echo "=== $(date --iso-8601=seconds) exit $status"
} >>"$log" 2>&1
exit "${status:-0}"
