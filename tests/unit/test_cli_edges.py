"""The command line's edges, in process: no configuration to check, Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcd import cli, config


def test_check_config_with_nothing_to_check_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("GCD_CONFIG", raising=False)
    assert cli.main(["check-config"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "",
        "gcd: no configuration to check: name a file, set $GCD_CONFIG, or create "
        f"{tmp_path / 'absent.yaml'}\n",
    )


def test_ctrl_c_during_a_plan_is_exit_130_in_one_line(tmp_path: Path) -> None:
    path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(path)
    hung.listen(8)  # accepts, never answers: gcd waits in its first request
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"version: 1\nstate_dir: {tmp_path}/s\nengine: {{url: 'unix://{path}'}}\n")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "gcd", "plan", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "GCD_CONFIG"},
        )
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        hung.close()
    assert (process.returncode, out, err) == (130, "", "gcd: interrupted\n")
