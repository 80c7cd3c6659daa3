"""Opening the engine a front end asked for: a local model file (by library name or path) or a
remote engine (`--remote URL`). The one place both are made; the front end owns the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starling_local.config import environment
from starling_local.engine.interface import EngineLike


@dataclass(frozen=True)
class EngineSpec:
    """What to run replies on."""

    model: str | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    remote: str | None = None
    """The URL of a remote engine (vLLM, llama-server, `starling serve`): generation runs there."""
    remote_kind: str = "auto"
    remote_model: str | None = None
    remote_api_key: str | None = None
    speculate: bool | None = None
    """Speculative decoding with drafts looked up in the conversation (None: off, or the
    app's saved choice; see `engine.runtime.Engine.speculate`)."""
    flash_attn: bool | None = None
    kv_type: str | None = None
    """Attention settings (None: the defaults, see `engine.attention.default_attention`)."""

    def with_env(self) -> EngineSpec:
        """Fill what was not given from `STARLING_REMOTE` and `STARLING_REMOTE_API_KEY`."""
        from dataclasses import replace

        env = environment()
        return replace(
            self,
            remote=self.remote or env.remote,
            remote_api_key=self.remote_api_key or env.remote_api_key,
        )


def open_engine(
    spec: EngineSpec, on_progress: Callable[[float], None] | None = None
) -> tuple[EngineLike, str]:
    """The engine and the name conversations record it under."""
    if spec.remote:
        from starling_local.engine.remote import RemoteEngine

        remote = RemoteEngine(
            spec.remote,
            kind=spec.remote_kind,
            model=spec.remote_model,
            api_key=spec.remote_api_key,
        )
        return remote, f"{remote.model} @ {remote.url}"
    from starling_local.acquire.library import display_name, resolve_model
    from starling_local.engine.runtime import Engine

    path = resolve_model(spec.model)
    engine = Engine(
        path,
        n_ctx=spec.n_ctx,
        n_threads=spec.n_threads,
        n_gpu_layers=spec.n_gpu_layers,
        on_progress=on_progress,
        speculate=bool(spec.speculate),
        flash_attn=spec.flash_attn,
        kv_type=spec.kv_type,
    )
    return engine, display_name(engine.path)
