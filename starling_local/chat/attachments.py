"""Files put into a message: each as a fenced code block named after the file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from starling_local.errors import UsageError

#: Files larger than this are refused before they are read (no context holds more text).
MAX_FILE_BYTES = 1 << 20

LANGUAGES = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript",
    ".ts": "typescript", ".tsx": "tsx", ".jsx": "jsx", ".rs": "rust", ".go": "go",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".java": "java",
    ".kt": "kotlin", ".swift": "swift", ".rb": "ruby", ".php": "php", ".cs": "csharp",
    ".sh": "bash", ".bash": "bash", ".zsh": "zsh", ".ps1": "powershell", ".sql": "sql",
    ".html": "html", ".css": "css", ".scss": "scss", ".json": "json", ".yaml": "yaml",
    ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".xml": "xml", ".md": "markdown",
    ".tex": "latex", ".r": "r", ".lua": "lua", ".dockerfile": "dockerfile",
}  # fmt: skip


def read_text_file(path: Path) -> str:
    """A file's text, or one line saying why it cannot go into a prompt."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UsageError(f"{path}: not a file")
        if size > MAX_FILE_BYTES:
            raise UsageError(f"{path}: {size} bytes is too large for a prompt")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    if b"\0" in data:
        raise UsageError(f"{path}: a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def code_block(name: str, text: str) -> str:
    """`text` fenced (with a fence longer than any inside it), named and with its language."""
    language = LANGUAGES.get(Path(name).suffix.lower(), "")
    if Path(name).name.lower() == "dockerfile":
        language = "dockerfile"
    fence = "```"
    while fence in text:
        fence += "`"
    return f"`{name}`:\n{fence}{language}\n{text.rstrip()}\n{fence}"


def with_files(
    text: str,
    paths: Sequence[Path],
    *,
    count_tokens: Callable[[str], int] | None = None,
    n_ctx: int | None = None,
) -> str:
    """`text` followed by each file as a code block; a file larger than the context window
    (when `count_tokens` and `n_ctx` are given) is refused."""
    blocks = []
    for path in paths:
        block = code_block(path.name, read_text_file(path))
        if count_tokens is not None and n_ctx is not None:
            tokens = count_tokens(block)
            if tokens >= n_ctx:
                raise UsageError(
                    f"{path}: {tokens} tokens do not fit the {n_ctx}-token context window"
                )
        blocks.append(block)
    return "\n\n".join(part for part in (text.strip(), *blocks) if part)
