"""What the user sets outside a command line, in one typed object: the `STARLING_*` environment
variables and the preferences the app keeps (`config.json` in the config directory, written
atomically when changed). `STARLING_HOME` is read by `paths`, which everything else builds on.

Read when needed (never at import), so a test or a shell that changes the environment is seen.
A value that cannot mean anything is a one-line error naming the variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from starling_local.errors import UsageError
from starling_local.paths import ensure, get_paths

Switch = Literal["auto", "on", "off"]

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


@dataclass(frozen=True)
class Environment:
    """The `STARLING_*` variables."""

    model: str | None = None
    """`STARLING_MODEL`: the model used when none is named."""
    remote: str | None = None
    """`STARLING_REMOTE`: generate on this remote engine (vLLM, llama-server, `starling serve`)."""
    remote_api_key: str | None = None
    """`STARLING_REMOTE_API_KEY`: the remote engine's API key."""
    api_key: str | None = None
    """`STARLING_API_KEY`: the key `starling serve` asks its clients for."""
    kv_cache_bytes: int = 4 << 30
    """`STARLING_KV_CACHE_MB`: the cap on saved KV state files, all models together."""
    sequence_cache_bytes: int = 2 << 30
    """`STARLING_SEQUENCE_CACHE_MB`: the cap on KV caches kept in RAM between conversations."""
    backups: bool = True
    """`STARLING_BACKUPS=0`: no daily history backup."""
    cpu_extra_buffers: Switch = "auto"
    """`STARLING_CPU_EXTRA_BUFFERS`: llama.cpp's AMX and repacked CPU buffers (auto: all of
    them, less AMX where a probe finds it unusable, see `llamacpp.cpu_kernels`)."""
    mistral_tokenizer: Path | None = None
    """`STARLING_MISTRAL_TOKENIZER`: the tokenizer.model synthetic test models use."""

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            return env.get(name, "").strip() or None

        tokenizer = text("STARLING_MISTRAL_TOKENIZER")
        return cls(
            model=text("STARLING_MODEL"),
            remote=text("STARLING_REMOTE"),
            remote_api_key=text("STARLING_REMOTE_API_KEY"),
            api_key=text("STARLING_API_KEY"),
            kv_cache_bytes=_mib(env, "STARLING_KV_CACHE_MB", cls.kv_cache_bytes),
            sequence_cache_bytes=_mib(env, "STARLING_SEQUENCE_CACHE_MB", cls.sequence_cache_bytes),
            backups=_switch(env, "STARLING_BACKUPS", "on") != "off",
            cpu_extra_buffers=_switch(env, "STARLING_CPU_EXTRA_BUFFERS", "auto"),
            mistral_tokenizer=Path(tokenizer) if tokenizer else None,
        )


def environment() -> Environment:
    """The `STARLING_*` variables as they are now."""
    return Environment.read()


def _mib(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise UsageError(f"{name} must be a whole number of MiB, not {value!r}")
    return int(value) << 20


def _switch(env: Mapping[str, str], name: str, default: Switch) -> Switch:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value == "auto":
        return "auto"
    if value in _ON:
        return "on"
    if value in _OFF:
        return "off"
    raise UsageError(f"{name} must be on or off (1 or 0), not {value!r}")


@dataclass(frozen=True)
class Preferences:
    """What the app remembers between runs (`config.json`)."""

    default_model: str | None = None
    """`starling models default NAME`: the library model used when none is named."""
    theme: str | None = None
    """The app's theme, as last chosen in the command palette."""
    speculate: bool | None = None
    """Speculative decoding, as last switched in the app (None: never switched)."""

    @classmethod
    def from_json(cls, data: Any) -> Preferences:
        """The preferences in a parsed `config.json` (what is missing or of the wrong type is
        left at its default: a hand-edited file never stops the app)."""
        data = data if isinstance(data, dict) else {}

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) and value else None

        speculate = data.get("speculate")
        return cls(
            default_model=text("default_model"),
            theme=text("theme"),
            speculate=speculate if isinstance(speculate, bool) else None,
        )


def _config_file() -> Path:
    return get_paths().config / "config.json"


def _raw_config() -> dict[str, Any]:
    try:
        data = json.loads(_config_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def preferences() -> Preferences:
    """The saved preferences (the defaults when there are none or the file is unreadable)."""
    return Preferences.from_json(_raw_config())


def save_preferences(**changes: str | bool | None) -> None:
    """Change some preferences (`default_model=`, `theme=`, `speculate=`), keeping the rest
    and any keys a newer version wrote."""
    known = set(Preferences.__dataclass_fields__)
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown preference {sorted(unknown)[0]!r}")
    folder = ensure(get_paths().config)
    data = {**_raw_config(), **changes}
    tmp = folder / f".config.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, folder / "config.json")
