"""Converting a Hugging Face Starling/Mistral/Llama safetensors checkpoint to GGUF.

What llama.cpp's own converter does for this architecture, streamed: the GGUF header is written
from the safetensors headers alone, then each tensor is read (memory-mapped), converted and
written before the next one is touched, so peak memory is about one tensor, not one model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from starling_local.acquire.safetensors_io import (
    SafetensorsError,
    iter_checkpoint,
    to_bf16_bits,
)
from starling_local.errors import StarlingError, UsageError
from starling_local.files import atomic_output, require_free_space
from starling_local.gguf.info import OPENCHAT_TEMPLATE
from starling_local.progress import Progress
from starling_local.vocab import END_OF_TURN

SUPPORTED = ("MistralForCausalLM", "LlamaForCausalLM")


class ConvertError(StarlingError):
    """The checkpoint cannot be converted."""


class OutType(str, Enum):
    """Element type of the converted 2-D weights (1-D tensors always stay F32)."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"

    @property
    def itemsize(self) -> int:
        return 4 if self is OutType.F32 else 2


@dataclass(frozen=True)
class Hyperparams:
    """The parts of config.json the GGUF needs."""

    architecture: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Hyperparams:
        archs = config.get("architectures") or ["?"]
        if archs[0] not in SUPPORTED:
            raise UsageError(
                f"unsupported architecture {archs[0]!r}: starling-local converts "
                f"{' and '.join(SUPPORTED)} checkpoints"
            )
        n_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            architecture=archs[0],
            n_layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            context_length=int(config.get("max_position_embeddings", 4096)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_eps=float(config.get("rms_norm_eps", 1e-5)),
            vocab_size=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or hidden // n_heads),
        )


def permute_qk(weight: npt.NDArray[np.float32], n_heads: int) -> npt.NDArray[np.float32]:
    """Hugging Face's rotate-half Q/K rows to llama.cpp's interleaved RoPE layout."""
    rows, cols = weight.shape
    out: npt.NDArray[np.float32] = (
        weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )
    return out


# --- vocabulary ------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content"))
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: unreadable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def load_vocabulary(directory: Path, vocab_size: int) -> Vocabulary:
    """The sentencepiece vocabulary plus the added tokens, as llama.cpp wants it.

    Added tokens that the tokenizer config marks special (Starling's `<|end_of_turn|>` and
    `<|pad_0|>`) become CONTROL tokens, so that llama.cpp never parses them out of user text.
    Tokens named only in `special_tokens_map.json` (alpha's stray `<sep>`) are ignored.
    """
    import gguf
    from sentencepiece import SentencePieceProcessor

    model_file = directory / "tokenizer.model"
    if not model_file.exists():
        raise ConvertError(f"{directory}: no tokenizer.model (a sentencepiece model is needed)")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_file))
    except (OSError, RuntimeError) as exc:
        raise ConvertError(f"{model_file}: not a sentencepiece model") from exc
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        types.append(int(kind))

    tok_config = _read_json(directory / "tokenizer_config.json")
    special_flags = {
        str(spec.get("content")): bool(spec.get("special", True))
        for spec in (tok_config.get("added_tokens_decoder") or {}).values()
        if isinstance(spec, dict)
    }
    added = {str(k): int(v) for k, v in _read_json(directory / "added_tokens.json").items()}
    for piece, token_id in sorted(added.items(), key=lambda kv: kv[1]):
        if token_id < len(tokens):
            continue
        if token_id != len(tokens):
            raise ConvertError(f"added_tokens.json: ids are not contiguous at {piece!r}={token_id}")
        tokens.append(piece.encode("utf-8"))
        scores.append(-1000.0)
        special = special_flags.get(piece, True)
        types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
    if len(tokens) > vocab_size:
        raise ConvertError(f"tokenizer has {len(tokens)} tokens but config says {vocab_size}")
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))

    ids = {t.decode("utf-8", "replace"): i for i, t in enumerate(tokens)}

    def lookup(key: str, default: int | None) -> int | None:
        text = _token_text(tok_config.get(key))
        return ids.get(text, default) if text else default

    template = tok_config.get("chat_template")
    has_eot = END_OF_TURN in ids
    if not isinstance(template, str):
        template = OPENCHAT_TEMPLATE if has_eot else None
    return Vocabulary(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=lookup("bos_token", sp.bos_id()) or 1,
        # OpenChat models end every turn with <|end_of_turn|>: that is their end of generation.
        eos_id=ids[END_OF_TURN] if has_eot else (lookup("eos_token", sp.eos_id()) or 2),
        unk_id=lookup("unk_token", sp.unk_id()) or 0,
        pad_id=lookup("pad_token", None),
        add_bos=bool(tok_config.get("add_bos_token", True)),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        chat_template=template,
    )


# --- the conversion --------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF to write: its name, shape, type, and how to get its data."""

    gguf_name: str
    shape: tuple[int, ...]
    out_dtype: str  # "f32" | "f16" | "bf16"
    load: Callable[[], npt.NDArray[np.float32]]
    permute_heads: int = 0  # 0: no permutation
    load_rows: Callable[[int, int], npt.NDArray[np.float32]] | None = None
    """Reads a block of rows; lets a large tensor be converted a block at a time."""

    @property
    def out_nbytes(self) -> int:
        n = int(np.prod(self.shape))
        return n * (4 if self.out_dtype == "f32" else 2)

    def data(self) -> npt.NDArray[Any]:
        """The tensor converted to its output type (the only time its data is in memory).

        Large tensors that need no permutation are converted a block of rows at a time, so only
        the output array is ever whole in memory (no float32 copy of a 500 MB embedding).
        """
        n = int(np.prod(self.shape))
        if self.load_rows is not None and not self.permute_heads and n > CHUNK_ELEMENTS:
            out = np.empty(self.shape, dtype=_NUMPY_OUT[self.out_dtype])
            step = max(1, CHUNK_ELEMENTS // int(np.prod(self.shape[1:])))
            for start in range(0, self.shape[0], step):
                stop = min(self.shape[0], start + step)
                out[start:stop] = _cast(self.load_rows(start, stop), self.out_dtype)
            return out
        data = self.load()
        if self.permute_heads:
            data = permute_qk(data, self.permute_heads)
        return np.ascontiguousarray(_cast(data, self.out_dtype))


CHUNK_ELEMENTS = 1 << 22
_NUMPY_OUT: dict[str, Any] = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


def _cast(data: npt.NDArray[np.float32], out_dtype: str) -> npt.NDArray[Any]:
    if out_dtype == "bf16":
        return to_bf16_bits(data)
    return data.astype(_NUMPY_OUT[out_dtype], copy=False)


def plan_tensors(directory: Path, hp: Hyperparams, outtype: OutType) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name and type, without reading any data."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layers)
    planned = []
    try:
        refs = list(iter_checkpoint(directory))
    except SafetensorsError as exc:
        raise ConvertError(str(exc)) from exc
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{directory}: unreadable checkpoint ({exc})") from exc
    for ref in refs:
        if ref.name.endswith(".rotary_emb.inv_freq"):
            continue
        new = name_map.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConvertError(f"cannot map tensor {ref.name!r}: not a {hp.architecture} weight")
        heads = 0
        if ref.name.endswith("q_proj.weight"):
            heads = hp.n_heads
        elif ref.name.endswith("k_proj.weight"):
            heads = hp.n_kv_heads
        out = "f32" if len(ref.shape) == 1 else outtype.value
        planned.append(PlannedTensor(new, ref.shape, out, ref.load_f32, heads, ref.load_rows_f32))
    names = {p.gguf_name for p in planned}
    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in names:
            raise ConvertError(f"{directory}: checkpoint has no {required} tensor")
    return planned


def read_config(directory: Path) -> Hyperparams:
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory (expected a Hugging Face checkpoint)")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConvertError(f"{directory}: no config.json (not a Hugging Face checkpoint)")
    try:
        return Hyperparams.from_config(_read_json(config_path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvertError(f"{config_path}: missing or bad field {exc}") from exc


def convert_checkpoint(
    directory: Path,
    out: Path,
    outtype: OutType = OutType.F16,
    progress: Progress | None = None,
    name: str | None = None,
) -> Path:
    """Convert the checkpoint in `directory` to the GGUF file `out` and return it."""
    hp = read_config(directory)
    vocab = load_vocabulary(directory, hp.vocab_size)
    planned = plan_tensors(directory, hp, outtype)
    return write_gguf(out, hp, vocab, planned, outtype, progress, name or directory.name)


def write_gguf(
    out: Path,
    hp: Hyperparams,
    vocab: Vocabulary,
    planned: list[PlannedTensor],
    outtype: OutType,
    progress: Progress | None = None,
    name: str = "starling",
) -> Path:
    """Write a llama-architecture GGUF, one tensor in memory at a time."""
    import gguf

    total = sum(p.out_nbytes for p in planned)
    require_free_space(out.parent, total + (8 << 20), out.name)
    file_type = {
        OutType.F32: gguf.LlamaFileType.ALL_F32,
        OutType.F16: gguf.LlamaFileType.MOSTLY_F16,
        OutType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    }[outtype]
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            writer.add_name(name)
            writer.add_context_length(hp.context_length)
            writer.add_embedding_length(hp.hidden)
            writer.add_block_count(hp.n_layers)
            writer.add_feed_forward_length(hp.intermediate)
            writer.add_head_count(hp.n_heads)
            writer.add_head_count_kv(hp.n_kv_heads)
            writer.add_rope_freq_base(hp.rope_theta)
            writer.add_layer_norm_rms_eps(hp.rms_eps)
            writer.add_rope_dimension_count(hp.head_dim)
            writer.add_vocab_size(hp.vocab_size)
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_vocabulary(writer, vocab)
            for p in planned:
                dtype: Any = _NUMPY_OUT[p.out_dtype]
                raw = gguf.GGMLQuantizationType.BF16 if p.out_dtype == "bf16" else None
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(dtype), p.out_nbytes, raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for p in planned:
                writer.write_tensor_data(p.data())
                done += p.out_nbytes
                if progress:
                    progress(done, total, p.gguf_name)
            writer.flush()
        finally:
            writer.close()
    return out


def _add_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    if vocab.eos_id != 2 and END_OF_TURN.encode() in vocab.tokens:
        writer.add_eot_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
