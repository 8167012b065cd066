#!/usr/bin/env bash
# Start a local MLflow tracking server for sharp-unlearn: SQLite backend, local
# artifact store served over HTTP, bound to 127.0.0.1 by default.
#
#   mlflow/start-local.sh                 # background server, prints the URI to use
#   mlflow/start-local.sh --port 5001 --data-dir /data/mlflow
#   mlflow/start-local.sh --foreground    # run in this terminal (Ctrl-C stops it)
#   mlflow/start-local.sh --stop          # stop the background server started from --data-dir
#
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000  (or pass --tracking-uri).
#
# Why these flags: one worker and no job runner keep the server at ~2 processes
# (the default is 4 workers plus a job runner: ~2 GB of memory, ~20 s to start);
# --artifacts-destination makes clients send artifacts through the server, so a
# client never needs access to the artifact directory itself.
set -euo pipefail

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-1}"
DATA_DIR="${MLFLOW_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/sharp-unlearn/mlflow}"
WAIT_S="${MLFLOW_START_TIMEOUT:-60}"
FOREGROUND=0
STOP=0

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options (environment variable in brackets):
  --host HOST        interface to bind [MLFLOW_HOST] (default 127.0.0.1; anything else exposes an
                     unauthenticated server: see mlflow/README.md)
  --port PORT        [MLFLOW_PORT] (default 5000)
  --workers N        [MLFLOW_WORKERS] (default 1)
  --data-dir DIR     SQLite database, artifacts, log and pid file [MLFLOW_DATA_DIR]
                     (default \$XDG_DATA_HOME/sharp-unlearn/mlflow)
  --timeout S        seconds to wait for /health [MLFLOW_START_TIMEOUT] (default 60)
  --foreground       run in the foreground instead of in the background
  --stop             stop the background server recorded in DATA_DIR/server.pid
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$2"; shift 2 ;;
        --timeout) WAIT_S="$2"; shift 2 ;;
        --foreground) FOREGROUND=1; shift ;;
        --stop) STOP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "start-local.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT < 1 || PORT > 65535 )); then
    echo "start-local.sh: --port '$PORT' is not a port number (1-65535)" >&2; exit 2
fi
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]] || (( WORKERS < 1 )); then
    echo "start-local.sh: --workers '$WORKERS' must be a positive integer" >&2; exit 2
fi

PID_FILE="$DATA_DIR/server.pid"
LOG_FILE="$DATA_DIR/server.log"

if (( STOP )); then
    if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        kill "$(cat "$PID_FILE")"   # the main process stops its workers
        rm -f "$PID_FILE"
        echo "stopped the MLflow server of $DATA_DIR"
        exit 0
    fi
    echo "start-local.sh: no running server recorded in $PID_FILE" >&2
    exit 1
fi

if ! command -v mlflow >/dev/null 2>&1; then
    echo "start-local.sh: the 'mlflow' command is missing; install it with: pip install 'sharp-unlearn[mlflow]'" >&2
    exit 2
fi

if [[ "$HOST" != "127.0.0.1" && "$HOST" != "localhost" && "$HOST" != "::1" ]]; then
    echo "start-local.sh: warning: binding to $HOST exposes a server without authentication;" \
         "prefer an SSH tunnel, or the compose setup behind a proxy (mlflow/README.md)" >&2
fi

mkdir -p "$DATA_DIR/artifacts"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
PID_FILE="$DATA_DIR/server.pid"
LOG_FILE="$DATA_DIR/server.log"
URI="http://$HOST:$PORT"
[[ "$HOST" == "::1" ]] && URI="http://[::1]:$PORT"

if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "start-local.sh: a server from $DATA_DIR is already running (pid $(cat "$PID_FILE"));" \
         "stop it with: $0 --data-dir '$DATA_DIR' --stop" >&2
    exit 1
fi
if curl -fsS -m 2 "$URI/health" >/dev/null 2>&1; then
    echo "start-local.sh: something already answers on $URI; choose another --port" >&2
    exit 1
fi

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
ARGS=(server
      --backend-store-uri "sqlite:///$DATA_DIR/mlflow.db"
      --artifacts-destination "$DATA_DIR/artifacts"
      --host "$HOST" --port "$PORT" --workers "$WORKERS")

if (( FOREGROUND )); then
    echo "MLflow server on $URI (data in $DATA_DIR); export MLFLOW_TRACKING_URI=$URI" >&2
    exec mlflow "${ARGS[@]}"
fi

nohup mlflow "${ARGS[@]}" >"$LOG_FILE" 2>&1 &
SERVER_PID=$!
echo "$SERVER_PID" >"$PID_FILE"

deadline=$((SECONDS + WAIT_S))
until curl -fsS -m 2 "$URI/health" >/dev/null 2>&1; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        rm -f "$PID_FILE"
        echo "start-local.sh: the server exited during start-up; last lines of $LOG_FILE:" >&2
        tail -n 20 "$LOG_FILE" >&2
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        kill "$SERVER_PID" 2>/dev/null || true
        rm -f "$PID_FILE"
        echo "start-local.sh: no answer on $URI/health after ${WAIT_S}s; see $LOG_FILE" >&2
        exit 1
    fi
    sleep 0.5
done

echo "MLflow server running (pid $SERVER_PID, data in $DATA_DIR, log $LOG_FILE)" >&2
echo "stop it with: $0 --data-dir '$DATA_DIR' --stop" >&2
echo "$URI"
