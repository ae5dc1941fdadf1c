"""The root command: version, help, one-line errors and --debug."""

from __future__ import annotations

from _support import run_cli


def test_version():
    from speculators_core import __version__

    out = run_cli(["--version"])
    assert out.returncode == 0
    assert out.stdout.strip() == f"speculators {__version__}"


def test_unknown_command_is_a_usage_error():
    out = run_cli(["frobnicate"])
    assert out.returncode == 2
    assert "No such command 'frobnicate'" in out.stderr


def test_unknown_option_is_a_usage_error():
    out = run_cli(["plugins", "--nope"])
    assert out.returncode == 2 and "No such option" in out.stderr


def test_speculators_error_exit_code_and_traceback_flag(monkeypatch, capsys):
    import click
    import pytest

    from speculators_core.cli import main as main_module
    from speculators_core.errors import SpeculatorsError

    @click.command("explode")
    def explode() -> None:
        raise SpeculatorsError("store 'x' is missing; run 'speculators data hidden-states' first")

    main_module.cli.add_command(explode)
    try:
        with pytest.raises(SystemExit) as info:
            main_module.main(["explode"])
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert err == "error: store 'x' is missing; run 'speculators data hidden-states' first\n"

        with pytest.raises(SystemExit):
            main_module.main(["--debug", "explode"])
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.endswith("first\n")
    finally:
        main_module.cli.commands.pop("explode")


def test_unexpected_exception_is_one_line_without_debug(capsys):
    import click
    import pytest

    from speculators_core.cli import main as main_module

    @click.command("crash")
    def crash() -> None:
        raise RuntimeError("unexpected")

    main_module.cli.add_command(crash)
    try:
        with pytest.raises(SystemExit) as info:
            main_module.main(["crash"])
        assert info.value.code == 1
        assert (
            capsys.readouterr().err
            == "error: RuntimeError: unexpected (run with --debug for the traceback)\n"
        )
    finally:
        main_module.cli.commands.pop("crash")
