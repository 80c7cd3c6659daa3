"""Getting Starling from a local stand-in for the Hub, through the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, starling
from tests.fake_hub import FakeHub, start

GGUF_REPO = "TheBloke/Starling-LM-7B-alpha-GGUF"
GGUF_NAME = "starling-lm-7b-alpha.Q4_K_M.gguf"
CKPT_REPO = "berkeley-nest/Starling-LM-7B-alpha"


@pytest.fixture
def hub(tiny_q4: Path, tiny_checkpoint: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add_repo(GGUF_REPO, {GGUF_NAME: tiny_q4.read_bytes(), "README.md": b"# GGUF"})
    ckpt = fake.add_dir(CKPT_REPO, tiny_checkpoint)
    ckpt.files["pytorch_model.bin"] = b"not wanted"
    servers = start(fake)
    yield fake
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def env(tmp_path: Path, hub: FakeHub, starling_home: Path) -> dict[str, str]:
    os.environ.pop("HF_HUB_OFFLINE", None)
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "STARLING_HOME": str(starling_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def run(env: dict[str, str], *args: str | Path, **extra: str) -> object:
    saved = dict(os.environ)
    os.environ.update(env)
    os.environ.update(extra)
    try:
        return starling(*args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cdn_gets(hub: FakeHub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests if r[0] == "GET" and r[1].startswith("/cdn/")]


def test_pull_verifies_registers_and_then_works_offline(
    hub: FakeHub, env: dict[str, str], tiny_q4: Path
) -> None:
    r = run(env, "pull", "--json")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert entry["name"] == "starling-lm-7b-alpha:Q4_K_M"
    assert entry["verified"] is True and entry["source"] == "huggingface"
    assert Path(entry["path"]).read_bytes() == tiny_q4.read_bytes()
    assert "/hub/models--TheBloke--Starling-LM-7B-alpha-GGUF/snapshots/" in entry["path"]
    blobs = Path(env["HF_HOME"]) / "hub/models--TheBloke--Starling-LM-7B-alpha-GGUF/blobs"
    assert [p.name for p in blobs.iterdir()] == [entry["sha256"]]  # one copy, in the Hub cache
    listed = json.loads(run(env, "models", "--json").stdout)
    assert [m["name"] for m in listed] == ["starling-lm-7b-alpha:Q4_K_M"]

    before = len(hub.requests)
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    again = run(offline, "pull")
    assert again.returncode == 0, again.stderr
    ask = run(
        offline, "ask", "Hello", "--model", "starling-lm-7b-alpha", "--json", "--max-tokens", "4"
    )
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["completion_tokens"] == 4
    default = run({**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, "ask", "Hi", "--max-tokens", "2")
    assert default.returncode == 0, default.stderr  # no --model: the library's default
    assert len(hub.requests) == before  # nothing asked of the Hub


def test_wrong_sha256_is_caught_and_nothing_registered(hub: FakeHub, env: dict[str, str]) -> None:
    hub.repos[GGUF_REPO].lie_about_sha.add(GGUF_NAME)
    r = run(env, "pull", "starling-lm-7b-alpha:Q4_K_M")
    assert_one_line_error(r, 1, "sha256 mismatch")
    assert json.loads(run(env, "models", "--json").stdout) == []
    blobs = Path(env["HF_HOME"]) / "hub/models--TheBloke--Starling-LM-7B-alpha-GGUF/blobs"
    assert list(blobs.iterdir()) == []  # the bad file was deleted


def test_dropped_connection_is_resumed_not_restarted(
    hub: FakeHub, env: dict[str, str], tiny_q4: Path
) -> None:
    size = tiny_q4.stat().st_size
    hub.drop_after[GGUF_NAME] = 11_000_000
    r = run(env, "pull")
    assert r.returncode == 0, r.stderr
    gets = cdn_gets(hub)
    assert len(gets) == 2
    assert gets[0][2] is None and gets[1][2] is not None
    resumed_from = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert resumed_from >= 10_000_000
    assert hub.bytes_served[GGUF_NAME] < size * 1.2


def test_interrupted_download_resumes_on_the_next_run(
    hub: FakeHub, env: dict[str, str], tiny_q4: Path
) -> None:
    hub.kill_after[GGUF_NAME] = 11_000_000  # the network dies for good after 11 MB
    first = run(env, "pull")
    assert_one_line_error(first, 1, "run the same command again to resume")
    blobs = Path(env["HF_HOME"]) / "hub/models--TheBloke--Starling-LM-7B-alpha-GGUF/blobs"
    partial = [p for p in blobs.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and partial[0].stat().st_size >= 10_000_000
    kept = partial[0].stat().st_size
    del hub.kill_after[GGUF_NAME]
    hub.requests.clear()
    second = run(env, "pull")
    assert second.returncode == 0, second.stderr
    assert cdn_gets(hub)[0][2] == f"bytes={kept}-"
    assert json.loads(run(env, "models", "--json").stdout)[0]["verified"] is True


def test_not_enough_disk_is_refused_before_downloading(hub: FakeHub, env: dict[str, str]) -> None:
    # A nearly full disk cannot be made here cheaply: the free-space probe reports 1 MiB.
    code = (
        "import sys, starling_local.files as f\n"
        "f.free_bytes = lambda directory: 1 << 20\n"
        "from starling_local.cli import main\n"
        "sys.exit(main(['pull']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert_one_line_error(r, 1, "not enough disk space")
    assert cdn_gets(hub) == []  # refused before a byte was fetched


def test_list_and_unknown_quant(env: dict[str, str]) -> None:
    r = run(env, "pull", "starling-lm-7b-beta", "--list")
    assert r.returncode == 0
    assert "Q4_K_M" in r.stdout and "IQ4_XS" in r.stdout and "(default)" in r.stdout
    bad = run(env, "pull", "starling-lm-7b-beta:Q7_K")
    assert_one_line_error(bad, 2, "available: Q2_K")


def test_modelscope_without_the_extra_says_how_to_get_it(env: dict[str, str]) -> None:
    try:
        import modelscope  # noqa: F401
    except ImportError:
        r = run(env, "pull", "--source", "modelscope")
        assert_one_line_error(r, 2, "pip install 'starling-local[modelscope]'")
    else:  # pragma: no cover - the extra is not part of the test install
        pytest.skip("modelscope is installed")


FAKE_MODELSCOPE = """
import json, os, shutil
def model_file_download(model_id, file_path, revision=None):
    with open(os.environ["MS_LOG"], "a") as log:
        log.write(json.dumps([model_id, file_path]) + "\\n")
    out = os.path.join(os.environ["MS_CACHE"], model_id, file_path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copy(os.environ["MS_SOURCE"], out)
    return out
"""


def test_modelscope_gets_the_modelscope_repository_id(tiny_q4: Path, tmp_path: Path) -> None:
    """ModelScope cannot be reached here, so a stand-in module records what is asked of it."""
    package = tmp_path / "site" / "modelscope" / "hub"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "file_download.py").write_text(FAKE_MODELSCOPE)
    log = tmp_path / "ms.log"
    env = dict(
        os.environ,
        PYTHONPATH=str(tmp_path / "site"),
        MS_LOG=str(log),
        MS_CACHE=str(tmp_path / "ms"),
        MS_SOURCE=str(tiny_q4),
        STARLING_HOME=str(tmp_path / "home"),
    )

    def pull(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "starling_local", "pull", *args, "--source", "modelscope"],
            capture_output=True,
            text=True,
            env=env,
        )

    # The catalog's GGUFs live on Hugging Face: their repo id is not a ModelScope id.
    assert_one_line_error(pull(), 2, "no ModelScope mirror of TheBloke/Starling-LM-7B-alpha-GGUF")
    assert not log.exists()  # nothing was asked of ModelScope
    r = pull("AI-ModelScope/Starling-GGUF/starling.Q4_K_M.gguf")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        ["AI-ModelScope/Starling-GGUF", "starling.Q4_K_M.gguf"]
    ]


def test_convert_from_repo_downloads_only_what_it_needs(hub: FakeHub, env: dict[str, str]) -> None:
    r = run(env, "convert", CKPT_REPO, "--quant", "Q4_K_M")
    assert r.returncode == 0, r.stderr
    name, path = r.stdout.split()
    assert name == "starling-lm-7b-alpha:Q4_K_M"
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if "/resolve/" in p and m == "HEAD"}
    assert "pytorch_model.bin" not in fetched and "config.json" in fetched
    entry = json.loads(run(env, "models", "--json").stdout)[0]
    assert entry["source"] == "converted" and entry["repo"] == CKPT_REPO
    assert entry["revision"] == hub.repos[CKPT_REPO].commit and entry["quant"] == "Q4_K_M"
    blobs = Path(env["HF_HOME"]) / "hub/models--berkeley-nest--Starling-LM-7B-alpha/blobs"
    assert list(blobs.iterdir()) == []  # the checkpoint download was cleaned up
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]
    ask = run(env, "ask", "Hello", "--model", name, "--json", "--max-tokens", "3")
    assert json.loads(ask.stdout)["completion_tokens"] == 3


def test_models_rm(hub: FakeHub, env: dict[str, str]) -> None:
    entry = json.loads(run(env, "pull", "--json").stdout)
    r = run(env, "models", "rm", entry["name"])
    assert r.returncode == 0, r.stderr
    assert not Path(entry["path"]).exists()
    assert json.loads(run(env, "models", "--json").stdout) == []
    assert_one_line_error(run(env, "models", "rm", "nope"), 2, "no model named")


def test_models_rm_keeps_a_file_the_user_registered(
    env: dict[str, str], tiny_q4: Path, tmp_path: Path
) -> None:
    own = tmp_path / "mine.gguf"
    own.write_bytes(tiny_q4.read_bytes())
    assert run(env, "pull", str(own)).returncode == 0
    r = run(env, "models", "rm", "mine")
    assert r.returncode == 0, r.stderr
    assert "your file stays" in str(r.stdout) and own.exists()
    assert json.loads(run(env, "models", "--json").stdout) == []


def test_unknown_repo_is_one_line(env: dict[str, str]) -> None:
    r = run(env, "pull", "someone/nothing-here/model.gguf")
    assert_one_line_error(r, 1, "no such repository")
