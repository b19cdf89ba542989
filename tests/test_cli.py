"""The ``segloop`` command: every subcommand has --help, usage errors exit 2, one exit-code map."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segloop import cli
from segloop.errors import ConfigError, StoreError, exit_code


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse exits for --help and usage errors
        return int(e.code or 0)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    assert run([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: segloop " + command), out[:200]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_unknown_flag_is_a_usage_error(command, capsys):
    assert run([command, "--no-such-flag"]) == 2
    assert "usage: segloop" in capsys.readouterr().err


def test_top_level_usage(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert run([]) == 2
    assert run(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err


def test_one_exit_code_map():
    assert exit_code(ConfigError("x")) == 2
    assert exit_code(StoreError("x")) == 1
    assert exit_code(KeyboardInterrupt()) == 130


def test_bad_config_exits_2_with_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: many\n")
    assert run(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid") and "epochs" in err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("segloop")
    assert script.exists(), "pip install -e . declares the `segloop` console script"
    done = subprocess.run([str(script), "versions", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: segloop versions" in done.stdout
    done = subprocess.run([str(script), "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr


ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_validates():
    from monitoring.actor import MonitorConfig
    from monitoring.rules import DEFAULT_RULES
    from segloop.config import load_config
    from train.config import TrainConfig
    from tune.config import load_search_config

    for name in ("pets.yaml", "coco.yaml"):
        load_config(TrainConfig, ROOT / "configs" / name)
    load_search_config(str(ROOT / "configs" / "tune_pets.yaml"), [])
    monitor = load_config(MonitorConfig, ROOT / "configs" / "monitor.yaml")
    assert monitor.rules == list(DEFAULT_RULES), "configs/monitor.yaml spells out the default rules"
    assert (ROOT / monitor.train_config).is_file()
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped == {"pets.yaml", "coco.yaml", "tune_pets.yaml", "monitor.yaml"}, "a new config needs a check here"


def test_serve_deploy_beyond_loopback_needs_a_token(tmp_path, capsys):
    """Exposing /predict without a bearer token is refused before anything is deployed (exit 2)."""
    import yaml

    from segloop.settings import is_loopback, require_token_off_loopback

    cfg = yaml.safe_load((Path(__file__).parents[1] / "serve_config.yaml").read_text())
    cfg["http_options"]["host"] = "0.0.0.0"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run(["serve", "deploy", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "beyond loopback" in err and "auth_token_env: SEGLOOP_TOKEN" in err
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "example.org"))
    require_token_off_loopback("0.0.0.0", has_token=True)  # with a token: allowed
    with pytest.raises(ConfigError, match="beyond loopback"):
        require_token_off_loopback("10.0.0.5", has_token=False)
