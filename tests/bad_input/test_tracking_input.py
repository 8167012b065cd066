"""Bad tracking input: a URI no store can open, an experiment name leading out of the store, a bad server.

Each is exit 2 with one line naming the value; the URI and name cases write nothing.
The server cases use tiny HTTP servers in a thread of this test: one whose API
never answers (``/health`` does), one whose API answers HTTP 500. MLflow's own
client retried those for minutes; the preflight gives up after one short request.
"""
from __future__ import annotations

import http.server
import threading

import pytest

from bad_input.harness import SMALL, assert_exit_2_one_line, run_cli, snapshot


@pytest.mark.parametrize("uri", ["foo://x", "ftp://host/x", "sqlite://mlruns.db"])
def test_unsupported_tracking_uri_is_refused_and_writes_nothing(tmp_path, uri):
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--tracking-uri", uri, f"output_dir={tmp_path / 'runs'}", *SMALL], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", repr(uri))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["..", "../outside", "a/../../b"])
def test_experiment_name_leading_out_of_the_store_is_refused(tmp_path, name):
    store = tmp_path / "store"
    store.mkdir()
    before = snapshot(tmp_path)
    proc = run_cli(["pretrain", "--tracking-uri", f"sqlite:///{store / 'mlruns.db'}", f"tracking.experiment={name}",
                    f"output_dir={tmp_path / 'runs'}", *SMALL], tmp_path)
    assert_exit_2_one_line(proc, "pretrain", f"tracking.experiment={name!r}")
    assert snapshot(tmp_path) == before  # no database, no artifacts next to or above mlartifacts/
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "b").exists()


class _BadApi(http.server.BaseHTTPRequestHandler):
    """``/health`` answers 200 (a preflight asking only that was fooled); the API hangs or fails."""

    mode = "hang"
    release: threading.Event

    def log_message(self, *args):  # keep the test output clean
        pass

    def _answer(self):
        if self.path.rstrip("/") == "/health":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
            return
        if self.mode == "hang":
            self.release.wait(300)  # never answers while the command runs; released when the test ends
            return
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "INTERNAL_ERROR", "message": "boom"}')

    do_GET = do_POST = _answer


@pytest.fixture(params=["hang", "500"])
def bad_server(request):
    release = threading.Event()
    handler = type("Handler", (_BadApi,), {"mode": request.param, "release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield request.param, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@pytest.mark.slow  # a CLI process that builds the data set before its run opens
def test_server_whose_api_hangs_or_fails_is_exit_2_one_line(tmp_path, bad_server):
    mode, uri = bad_server
    # no tight timing: MLflow's retries took 200-264 s; the whole command must end well inside 120 s
    proc = run_cli(["pretrain", "--tracking-uri", uri, f"output_dir={tmp_path / 'runs'}", "train.epochs=50",
                    *SMALL], tmp_path, timeout=120)
    line = assert_exit_2_one_line(proc, "pretrain", repr(uri))
    assert ("HTTP 500" in line) if mode == "500" else ("does not answer" in line)
    assert not list(tmp_path.rglob("checkpoint.pt"))  # stopped before the first epoch
