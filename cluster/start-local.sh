#!/usr/bin/env bash
# A local Ray "cluster" on this machine (loopback only), for trying --address before a real one.
#
#   cluster/start-local.sh [NUM_CPUS] [PORT]       # runs in the foreground; Ctrl-C stops it
#   # in another terminal:
#   sharp-unlearn sweep tuning/smoke.yaml --address 127.0.0.1:6379
#
# `--block` keeps the head in the foreground so stopping it stops exactly this Ray instance
# (`ray stop` would stop every Ray instance of this user on the machine). The dashboard (loopback
# only) serves Ray's state API, which Ray Train needs to release the placement group of a sharded
# sweep trial that the scheduler stopped.
set -euo pipefail
NUM_CPUS="${1:-$(nproc)}"
PORT="${2:-6379}"
TMP_DIR="${RAY_TMP_DIR:-/tmp/ray-sharp-unlearn-$PORT}"
# Ray lowers its workers to nice 15 by default, so on a machine shared with other work they get a
# few percent of a core; this head's workers run at the niceness this script was started with
# (`nice -n 10 cluster/start-local.sh` to yield). Set RAY_worker_niceness to choose otherwise.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
echo "starting a Ray head on 127.0.0.1:$PORT with $NUM_CPUS CPUs (temp dir $TMP_DIR)"
echo "sweeps: sharp-unlearn sweep tuning/smoke.yaml --address 127.0.0.1:$PORT"
exec ray start --head --block \
    --node-ip-address 127.0.0.1 --port "$PORT" \
    --num-cpus "$NUM_CPUS" --include-dashboard true --dashboard-host 127.0.0.1 \
    --temp-dir "$TMP_DIR"
