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

from gcd import cli, commands, config
from gcd.errors import Stopped
from gcd.signals import HELD, Held


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
            # As from a terminal: a shell's background job (a CI runner's) starts with
            # Ctrl-C ignored, and gcd rightly keeps ignoring it then.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        hung.close()
    assert (process.returncode, out, err) == (130, "", "gcd: interrupted\n")


def test_the_command_line_holds_signals_before_loading_the_rest_of_gcd() -> None:
    # Loading docker-py, PyYAML and RE2 takes about 0.15 s: a SIGTERM or SIGHUP then killed
    # the daemon (rc -15, 129). gcd.cli loads only what holding them needs.
    probe = (
        "import sys, gcd.cli; "
        "print(sorted(m for m in ('docker', 'yaml', 're2', 'apscheduler', 'gcd.config', "
        "'gcd.commands') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


def test_held_signals_reach_the_command_that_takes_them_in_order() -> None:
    got: list[int] = []
    before = {s: signal.getsignal(s) for s in HELD}
    signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(-signum))
    held = Held()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        assert held.received == [signal.SIGHUP, signal.SIGTERM, signal.SIGHUP]
        held.take_over(lambda signum, _frame: got.append(signum), (signal.SIGHUP,))
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    # SIGTERM, not taken, went back to its former handler (recording it negated), in turn.
    assert got == [signal.SIGHUP, -signal.SIGTERM, signal.SIGHUP]


def test_sigint_held_then_released_is_ctrl_c() -> None:
    # As in a terminal (a shell's background job starts with Ctrl-C ignored).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        held = Held()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            held.release()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_sigterm_while_gcd_run_starts_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "engine.sock")
    engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.bind(path)
    engine.listen(8)
    engine.settimeout(0)
    cfg = config.parse(
        f"version: 1\nstate_dir: {tmp_path}/s\nengine: {{url: 'unix://{path}'}}\n", "c.yaml"
    )
    before = {s: signal.getsignal(s) for s in HELD}
    held = Held()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Stopped, match=r"^stopped before the cycle began; nothing removed$"):
            commands.run(cfg, "text", held)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    with pytest.raises(BlockingIOError):
        engine.accept()  # not one request reached the engine
    engine.close()
