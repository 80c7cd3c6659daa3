"""Where starling-local keeps its files.

Everything comes from `platformdirs`; `STARLING_HOME` moves all of it under one root so
tests and users can isolate an installation. Nothing is created at import time: callers
ask for a directory with `ensure()` when they are about to write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "starling-local"


@dataclass(frozen=True)
class Paths:
    """The directories starling-local uses."""

    data: Path
    cache: Path
    config: Path
    logs: Path

    @property
    def models(self) -> Path:
        """Converted and quantized models made by starling-local."""
        return self.data / "models"

    @property
    def database(self) -> Path:
        """The SQLite file holding conversations and the model library."""
        return self.data / "starling.db"

    @property
    def engine_log(self) -> Path:
        """llama.cpp's own log (kept off the screen)."""
        return self.logs / "llama.log"


def get_paths() -> Paths:
    """Return the paths, honouring `STARLING_HOME`."""
    home = os.environ.get("STARLING_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(
            data=root / "data", cache=root / "cache", config=root / "config", logs=root / "logs"
        )
    import platformdirs

    dirs = platformdirs.PlatformDirs(APP_NAME, appauthor=False)
    return Paths(
        data=Path(dirs.user_data_dir),
        cache=Path(dirs.user_cache_dir),
        config=Path(dirs.user_config_dir),
        logs=Path(dirs.user_log_dir),
    )


def ensure(path: Path) -> Path:
    """Create a directory (and parents) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path
