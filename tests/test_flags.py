"""Every command's flags take their defaults from the settings dataclasses,
where each default is stated once, and --help shows them."""

import argparse
import dataclasses

import pytest

from engine_worker.__main__ import build_parser as engine_parser
from gateway.__main__ import build_parser as gateway_parser
from gateway.config import GatewaySettings
from media_worker.__main__ import build_parser as media_parser
from vllm_mlx.chat.__main__ import build_parser as chat_parser
from vllm_mlx.settings import ChatSettings, EngineSettings, MediaSettings
from vllm_mlx.supervision.supervisor import build_parser as supervisor_parser

# Flag dests whose settings field has another name.
ALIASES = {"media_fetch_timeout": "fetch_timeout_s", "max_media_redirects": "max_redirects",
           "allowed_local_media_path": "allowed_local_media_paths", "chat_port": "port"}
# Flags that belong to the command itself, with no settings field.
OWN = {"help", "model", "served_model_name", "api_key", "model_alias", "gateway_workers",
       "media_workers", "engine_port", "ready_timeout", "host", "port", "chat"}


def settings_default(dest: str, settings: list) -> tuple[bool, object]:
    """(found, default in the flag's unit) for a flag dest."""
    for s in settings:
        fields = {f.name: f for f in dataclasses.fields(s)}
        for name, scale in ((ALIASES.get(dest, dest), 1), (f"{dest}_s", 1),
                            (dest.removesuffix("_ms") + "_s", 1000)):
            if name in fields and (scale == 1 or dest.endswith("_ms")):
                value = getattr(s, name)
                value = list(value) if isinstance(value, tuple) else value
                return True, value * scale if scale != 1 else value
    return False, None


COMMANDS = {
    "engine": (engine_parser, [EngineSettings(model="")]),
    "gateway": (gateway_parser, [GatewaySettings()]),
    "media": (media_parser, [MediaSettings(model="")]),
    # ChatSettings first: --chat-port is its port, not the engine's.
    "vllm-mlx-up": (supervisor_parser, [ChatSettings(), EngineSettings(model=""),
                                        MediaSettings(model="")]),
    "vllm-mlx-chat": (chat_parser, [ChatSettings()]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flag_defaults_come_from_the_settings(command):
    build, settings = COMMANDS[command]
    parser = build()
    checked = 0
    for action in parser._actions:  # argparse lists its actions nowhere public
        if not action.option_strings or action.dest in OWN:
            continue
        found, expected = settings_default(action.dest, settings)
        assert found, f"{command}: --{action.dest} has no settings field (add it, or to OWN)"
        if isinstance(action, argparse._StoreFalseAction):
            assert expected is True, action.dest
        elif isinstance(action, argparse._StoreTrueAction):
            assert expected is False, action.dest
        else:
            assert action.default == expected, (command, action.dest)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default(command):
    parser = COMMANDS[command][0]()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        assert action.help, f"{command}: {action.option_strings[0]} has no help text"
        assert f"(default: {action.default})" in text, (command, action.option_strings[0])
