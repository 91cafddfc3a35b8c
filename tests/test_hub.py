"""The hub, faked on this machine: an unreachable hub is decided within seconds, an unknown id is refused.

The hub client reads HF_HUB_OFFLINE once, at import, and conftest sets it for every test: so the runs happen in
one child process started without it, with HF_ENDPOINT pointing at a local server (or at nothing).
"""
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from conftest import REPO

# In the child: time lightweight_small.main for each case, its stderr captured, after one untimed run of the
# first case (what a run imports, transformers partly on first use, is not the hub's time).
CHILD = """
import contextlib, io, json, os, sys, time
sys.path.insert(0, sys.argv[1])
import lightweight_small
cases, outcomes = json.loads(sys.argv[2]), {}
for name, endpoint, argv in cases[:1] + cases:
    os.environ["HF_ENDPOINT"] = endpoint
    err, started, code = io.StringIO(), time.perf_counter(), 0
    with contextlib.redirect_stderr(err):
        try:
            lightweight_small.main(argv)
        except SystemExit as e:
            code = e.code
    outcomes[name] = {"code": code, "seconds": time.perf_counter() - started, "stderr": err.getvalue()}
print(json.dumps(outcomes))
"""


def silent_server() -> str:
    """A server that accepts connections and never answers (a dead proxy, a captive network)."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.extend(iter(server.accept, None)), daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def not_found_server() -> str:
    """A hub that knows no model: 404 with the hub's RepoNotFound error code."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("hub")
    refused_port, silent, not_found = "http://127.0.0.1:9", silent_server(), not_found_server()
    cases = [("refused", refused_port, "nobody/unknown-arch"), ("silent", silent, "nobody/unknown-arch"),
             ("not-found", not_found, "nobody/no-such-model"), ("no-folder", refused_port, str(out / "no/such/dir"))]
    runs = [(name, url, ["--model", model, "--output-dir", str(out / name), "--cache-dir", str(cache_dir),
                         "--wandb", "off"]) for name, url, model in cases]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO), json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    for name, _, _ in cases:  # each a refusal: exit 2, one line, nothing written
        assert results[name]["code"] == 2, results[name]
        assert len([line for line in results[name]["stderr"].splitlines() if line.strip()]) == 1, results[name]
        assert not (out / name).exists()
    return {name: dict(r, endpoint=dict((c[0], c[1]) for c in cases)[name]) for name, r in results.items()}


@pytest.mark.parametrize("case", ["refused", "silent"])
def test_unreachable_hub_is_refused_within_seconds(case, outcomes):
    outcome = outcomes[case]
    assert f"no answer from {outcome['endpoint']}" in outcome["stderr"] and "--init random" in outcome["stderr"]
    assert outcome["seconds"] < 5  # the hub client's own retries took 27 s through a dead proxy, minutes here


def test_model_the_hub_does_not_know_is_refused(outcomes):
    assert "model nobody/no-such-model: the hub does not know it" in outcomes["not-found"]["stderr"]


def test_missing_local_folder_is_refused_as_such(outcomes):
    assert "no such folder, and not a hub id" in outcomes["no-folder"]["stderr"]
