"""The top-level `pixelwise` command: fast help, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pixelwise.cli import EXIT_USER_ERROR, main


def test_help_does_not_import_torch() -> None:
    # `pixelwise --help` must answer fast: building the whole parser may not load torch.
    code = (
        "import sys\n"
        "from pixelwise.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'torchvision', 'sympy', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USER_ERROR
    assert "usage: pixelwise" in capsys.readouterr().out


def test_user_error_is_one_line_without_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PIXELWISE_DEBUG", raising=False)
    # a dataset path that does not exist is a user mistake, reported on one line
    code = main(["data", "check", "/nonexistent/pixelwise-dataset"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("pixelwise: ")
    assert "Traceback" not in err
