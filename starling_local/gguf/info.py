"""Reading and checking GGUF files before anything trusts them.

A truncated download, a file that is not a GGUF, or a model of another architecture must give
one clear line, never a crash inside llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starling_local.errors import StarlingError
from starling_local.gguf.header import (
    GGML_TYPE_NAMES,
    GGML_TYPE_SIZES,
    HeaderError,
    read_header,
)
from starling_local.vocab import END_OF_TURN, END_OF_TURN_ID

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

#: The OpenChat 3.5 Jinja template as the Hub ships it for Starling.
OPENCHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() "
    "+ ': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)

# gguf.TokenType values (kept here so this module's callers need not import gguf).
TOKEN_TYPE_NAMES = {
    0: "UNDEFINED",
    1: "NORMAL",
    2: "UNKNOWN",
    3: "CONTROL",
    4: "USER_DEFINED",
    5: "UNUSED",
    6: "BYTE",
}


#: llama.cpp's general.file_type values.
FILE_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
}


class GGUFError(StarlingError):
    """The file cannot be used as a model."""


@dataclass
class GGUFInfo:
    """What matters about a GGUF for running Starling."""

    path: Path
    size: int
    architecture: str
    file_type: int | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    chat_template: str | None
    special_tokens: dict[int, tuple[str, str]] = field(default_factory=dict)
    """id -> (piece, token type name) for the ids Starling relies on."""
    tensor_count: int = 0
    n_params: int = 0
    tensor_types: list[str] = field(default_factory=list)
    name: str | None = None

    @property
    def quant(self) -> str:
        """The file type as a quantization name (`Q4_K_M`, `F16`, ...)."""
        if self.file_type is None:
            return "?"
        return FILE_TYPE_NAMES.get(int(self.file_type), f"type {self.file_type}")

    @property
    def end_of_turn_is_control(self) -> bool:
        return self.special_tokens.get(END_OF_TURN_ID, ("", ""))[1] == "CONTROL"

    @property
    def template_ok(self) -> bool:
        return self.chat_template is not None and _template_is_openchat(self.chat_template)

    def problems(self) -> list[str]:
        """Known defects of third-party Starling GGUFs, each one line."""
        found = []
        if self.vocab_size <= END_OF_TURN_ID:
            found.append(f"vocabulary has {self.vocab_size} tokens: no <|end_of_turn|> (id 32000)")
            return found
        piece = self.special_tokens.get(END_OF_TURN_ID, ("", ""))[0]
        if piece != END_OF_TURN:
            found.append(f"token 32000 is {piece!r}, not {END_OF_TURN!r}")
        if not self.end_of_turn_is_control:
            kind = self.special_tokens.get(END_OF_TURN_ID, ("", "?"))[1]
            found.append(f"<|end_of_turn|> is a {kind} token, not CONTROL")
        if self.eos_id != END_OF_TURN_ID:
            found.append(f"eos token is {self.eos_id}, not 32000 (<|end_of_turn|>)")
        if self.chat_template is None:
            found.append("no chat template")
        elif not self.template_ok:
            found.append("chat template is not the OpenChat 3.5 one")
        return found


def _template_is_openchat(template: str) -> bool:
    squashed = "".join(template.split())
    return "GPT4Correct" in squashed and "<|end_of_turn|>" in squashed and "Assistant:'" in squashed


def check_magic(path: Path) -> None:
    """Fail with one line unless `path` is a readable file starting with the GGUF magic."""
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    if not path.is_file():  # opening a FIFO would wait for a writer forever
        kind = "a FIFO" if path.is_fifo() else "a device or socket"
        raise GGUFError(f"{path}: is {kind}, not a GGUF file")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror}") from exc
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {head!r})")


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse the header and check that every tensor's data lies inside the file."""
    path = Path(path)
    check_magic(path)
    size = path.stat().st_size
    try:
        header = read_header(path)
    except HeaderError as exc:
        raise GGUFError(f"{path}: damaged or truncated GGUF ({exc})") from exc
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror}") from exc
    unknown = [t.name for t in header.tensors if t.ggml_type not in GGML_TYPE_SIZES]
    if unknown:
        raise GGUFError(f"{path}: tensor {unknown[0]} has a type this version cannot read")
    end = max(
        (header.data_offset + t.offset + t.n_bytes for t in header.tensors),
        default=0,  # a vocabulary-only file has no tensor data (nor the padding before it)
    )
    if end > size:
        raise GGUFError(
            f"{path}: truncated GGUF: its tensors need {end} bytes, the file has {size} "
            "(an interrupted download? fetch it again)"
        )
    f = header.fields
    arch = str(f.get("general.architecture", "unknown"))
    tokens = f.get("tokenizer.ggml.tokens") or []
    types = f.get("tokenizer.ggml.token_type") or []
    special: dict[int, tuple[str, str]] = {}
    for token_id in (1, 2, END_OF_TURN_ID, END_OF_TURN_ID + 1):
        if token_id < len(tokens):
            kind = TOKEN_TYPE_NAMES.get(types[token_id], "?") if token_id < len(types) else "?"
            special[token_id] = (tokens[token_id], kind)
    return GGUFInfo(
        path=path,
        size=size,
        architecture=arch,
        file_type=f.get("general.file_type"),
        context_length=f.get(f"{arch}.context_length"),
        block_count=f.get(f"{arch}.block_count"),
        embedding_length=f.get(f"{arch}.embedding_length"),
        vocab_size=len(tokens),
        bos_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_id=f.get("tokenizer.ggml.eos_token_id"),
        eot_id=f.get("tokenizer.ggml.eot_token_id"),
        chat_template=f.get("tokenizer.chat_template"),
        special_tokens=special,
        tensor_count=len(header.tensors),
        n_params=sum(t.n_elements for t in header.tensors),
        tensor_types=sorted(
            {GGML_TYPE_NAMES.get(t.ggml_type, str(t.ggml_type)) for t in header.tensors}
        ),
        name=f.get("general.name"),
    )


def check_runnable(path: str | Path, *, starling: bool = True) -> GGUFInfo:
    """`read_gguf`, and refuse architectures (and, with `starling`, vocabularies) that are not
    Starling's family."""
    info = read_gguf(path)
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{info.path}: architecture {info.architecture!r} is not supported "
            f"(starling-local runs Starling/Mistral-family 'llama' GGUFs)"
        )
    if starling and info.vocab_size <= END_OF_TURN_ID:
        raise GGUFError(
            f"{info.path}: vocabulary of {info.vocab_size} tokens has no <|end_of_turn|>: "
            "not a Starling/OpenChat model"
        )
    return info
