"""The server's flags table (service/flags.py): every flag reaches the configuration, takes its default from
its `TEXTGEN_*` variable, and refuses a value below its minimum or outside its choices, by name."""

from __future__ import annotations

import dataclasses

import pytest

from engine.batching import BatchConfig
from engine.frontend.engine import EngineConfig
from service.config import ServerConfig, parse_config
from service.flags import GROUPS, Flag, env_name

FLAGS = [flag for flags in GROUPS.values() for flag in flags]
# Flags that fill a part of the configuration rather than a field of their own name (service/config.py).
READ_INTO_PARTS = {"tls-cert-file", "tls-key-file", "tls-client-ca-file"}


@pytest.fixture(autouse=True)
def no_textgen_variables(monkeypatch):
    for flag in FLAGS:
        monkeypatch.delenv(env_name(flag.name), raising=False)


def test_every_flag_sets_a_configuration_field_of_its_name():
    fields = {
        f.name for config in (ServerConfig, EngineConfig, BatchConfig) for f in dataclasses.fields(config)
    }
    unread = [flag.name for flag in FLAGS if flag.name.replace("-", "_") not in fields]
    assert sorted(unread) == sorted(READ_INTO_PARTS)


def test_a_variable_sets_a_flags_default_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("TEXTGEN_MAX_N", "3")
    monkeypatch.setenv("TEXTGEN_MAX_WAIT_MS", "7.5")
    config = parse_config([])
    assert (config.engine.max_n, config.engine.batch.max_wait_ms) == (3, 7.5)
    assert parse_config(["--max-n", "5"]).engine.max_n == 5


@pytest.mark.parametrize("setting", ["0", "false", "No", "OFF"])
def test_a_switchs_variable_set_to_a_no_turns_it_off(setting, monkeypatch):
    monkeypatch.setenv("TEXTGEN_PREFIX_CACHING", setting)
    assert parse_config([]).engine.prefix_caching is False
    assert parse_config(["--prefix-caching"]).engine.prefix_caching is True


@pytest.mark.parametrize(
    "flag", [flag for flag in FLAGS if flag.minimum is not None], ids=lambda flag: flag.name
)
def test_a_value_below_a_flags_minimum_is_refused_by_name(flag: Flag, capsys):
    with pytest.raises(SystemExit):
        parse_config([f"--{flag.name}", str(flag.minimum - 1)])
    assert f"--{flag.name} must be at least {flag.minimum}" in capsys.readouterr().err


def test_a_variable_outside_a_flags_choices_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("TEXTGEN_DTYPE", "float8")
    with pytest.raises(SystemExit):
        parse_config([])
    assert "--dtype: invalid choice 'float8'" in capsys.readouterr().err
