"""The Starling models starling-local knows, and where they live.

Sizes are in bytes; where a publisher only gave GB figures the size is approximate and only
used for display and the free-space check (the Hub's own metadata is used when reachable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from starling_local.acquire.quantize import DEFAULT_QUANT
from starling_local.errors import UsageError


@dataclass(frozen=True)
class GGUFRepo:
    """A Hub repository of pre-quantized GGUF files."""

    repo_id: str
    pattern: str  # with `{quant}`
    sizes: dict[str, int]
    sha256: dict[str, str] = field(default_factory=dict)
    exact_sizes: bool = True
    modelscope_repo_id: str | None = None
    """A ModelScope repository holding the same files, where one is known."""

    def filename(self, quant: str) -> str:
        return self.pattern.format(quant=quant)


@dataclass(frozen=True)
class CatalogModel:
    name: str
    title: str
    checkpoint_repo: str
    gguf: GGUFRepo
    license: str
    modelscope_repo: str | None = None

    @property
    def quants(self) -> list[str]:
        return list(self.gguf.sizes)


_GB = 1_000_000_000

CATALOG: dict[str, CatalogModel] = {
    "starling-lm-7b-alpha": CatalogModel(
        name="starling-lm-7b-alpha",
        title="Starling-LM-7B-alpha (Berkeley NEST, C-RLFT + APA, MT-Bench 8.09)",
        checkpoint_repo="berkeley-nest/Starling-LM-7B-alpha",
        gguf=GGUFRepo(
            repo_id="TheBloke/Starling-LM-7B-alpha-GGUF",
            pattern="starling-lm-7b-alpha.{quant}.gguf",
            sizes={
                "Q2_K": 3083107264,
                "Q3_K_S": 3164577536,
                "Q3_K_M": 3518996224,
                "Q3_K_L": 3822034688,
                "Q4_0": 4108927808,
                "Q4_K_S": 4140385088,
                "Q4_K_M": 4368450368,
                "Q5_0": 4997728064,
                "Q5_K_S": 4997728064,
                "Q5_K_M": 5131421504,
                "Q6_K": 5942078336,
                "Q8_0": 7695874816,
            },
        ),
        license="research preview, non-commercial",
        # ModelScope mirrors the original weights (for `starling convert`), not these GGUFs.
        modelscope_repo="AI-ModelScope/Starling-LM-7B-alpha",
    ),
    "starling-lm-7b-beta": CatalogModel(
        name="starling-lm-7b-beta",
        title="Starling-LM-7B-beta (Nexusflow, PPO with Starling-RM-34B, MT-Bench 8.12)",
        checkpoint_repo="Nexusflow/Starling-LM-7B-beta",
        gguf=GGUFRepo(
            repo_id="bartowski/Starling-LM-7B-beta-GGUF",
            pattern="Starling-LM-7B-beta-{quant}.gguf",
            sizes={
                "Q2_K": int(2.72 * _GB),
                "Q3_K_S": int(3.16 * _GB),
                "IQ3_S": int(3.18 * _GB),
                "IQ4_XS": int(3.94 * _GB),
                "Q4_0": int(4.11 * _GB),
                "IQ4_NL": int(4.16 * _GB),
                "Q4_K_M": int(4.37 * _GB),
                "Q5_0": int(5.0 * _GB),
                "Q5_K_S": int(5.0 * _GB),
                "Q5_K_M": int(5.13 * _GB),
                "Q8_0": int(7.7 * _GB),
            },
            sha256={"Q4_K_M": "85ad53b9cab2e73d929425f19db65f2da5817745026ed0fc696e5ce5f8ed0303"},
            exact_sizes=False,
        ),
        license="Apache-2.0",
    ),
}
DEFAULT_MODEL = "starling-lm-7b-alpha"


@dataclass(frozen=True)
class ModelRef:
    """A parsed `NAME[:QUANT]`."""

    model: CatalogModel
    quant: str

    @property
    def key(self) -> str:
        return f"{self.model.name}:{self.quant}"

    @property
    def filename(self) -> str:
        return self.model.gguf.filename(self.quant)


_REPO_FILE_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/[^/].*\.gguf$", re.IGNORECASE)


def is_repo_file_spec(spec: str) -> bool:
    """`owner/repo/file.gguf` (a Hub file), as opposed to a relative or absolute local path."""
    return bool(_REPO_FILE_RE.match(spec)) and not Path(spec).exists()


def is_catalog_name(spec: str) -> bool:
    return spec.split(":", 1)[0].lower() in CATALOG


def parse_model_ref(spec: str | None, quant: str | None = None) -> ModelRef:
    """`starling-lm-7b-beta:Q5_K_M` (or a name plus `quant`) -> a catalog entry and quant."""
    name, _, tag = (spec or DEFAULT_MODEL).partition(":")
    model = CATALOG.get(name.lower())
    if model is None:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(CATALOG)}")
    chosen = (quant or tag or DEFAULT_QUANT).upper()
    if chosen not in model.gguf.sizes:
        raise UsageError(f"{model.name} has no {chosen} file; available: {', '.join(model.quants)}")
    return ModelRef(model, chosen)
