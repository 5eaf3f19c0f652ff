"""``priorclip-serve`` as a user starts it: a real process on a loopback port, then one-line errors for bad options."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest
from click.testing import CliRunner

from priorclip.serve.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_starts_answers_and_stops():
    exe = shutil.which("priorclip-serve") or pytest.skip("priorclip-serve is not installed (pip install -e .)")
    port = free_port()
    proc = subprocess.Popen([exe, "--model", "priorclip-tiny", "--device", "cpu", "--port", str(port),
                             "--log-level", "warning", "--max-text-chars", "40"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, proc.stdout.read() if proc.poll() is not None else ""
        assert ready.json()["selftest"]["passed"] is True
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "a runway"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == ready.json()["embed_dim"]
        long = httpx.post(f"{url}/v1/embeddings", json={"input": "a runway beside a long row of parked planes"},
                          timeout=30)  # 43 characters: over this process's --max-text-chars
        assert long.status_code == 422 and "over the limit of 40" in long.json()["error"]["message"], long.text
        assert "text/html" in httpx.get(url, timeout=10).headers["content-type"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGINT), proc.returncode


@pytest.mark.parametrize("args, says", [
    ([], "give an engine"),
    (["--engine", "/nonexistent/export"], "no manifest.json"),
    (["--model", "priorclip-tiny", "--max-items", "64", "--max-queue", "8"], "could never be admitted"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--engine", "/nonexistent/export", "--model", "priorclip-tiny"], "not both"),
    (["--model", "priorclip-tiny", "--mask-padding"], "--mask-padding does not apply"),
    (["--model", "pir-tiny", "--gate", "2belief"], "--gate does not apply"),
    (["--engine", "/some/export", "--precision", "fp16"], "--precision does not apply to --engine"),
])
def test_bad_options_are_one_line(args, says):
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error:") and says in lines[0], r.output
    assert "Traceback" not in r.output


def test_help_names_the_routes():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "/v1/embeddings" in r.output and "--max-batch" in r.output


def test_missing_service_packages_are_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    r = CliRunner().invoke(main, ["--model", "priorclip-tiny"])
    assert r.exit_code != 0 and r.output.strip() == \
        "Error: priorclip-serve needs fastapi: pip install 'priorclip[serve]'", r.output
