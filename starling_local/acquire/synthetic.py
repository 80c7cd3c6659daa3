"""Starling-shaped models with random weights and the real vocabulary.

Tests and benchmarks build their own models instead of downloading Starling: the real Mistral
v1 sentencepiece model (shipped in the `mistral-common` wheel) plus Starling's two added tokens,
so every token id is a real Starling id; random bfloat16 weights of any size up to 7B.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from starling_local.acquire.safetensors_io import to_bf16_bits, write_safetensors
from starling_local.config import environment
from starling_local.errors import StarlingError
from starling_local.gguf.info import OPENCHAT_TEMPLATE
from starling_local.progress import Progress


@dataclass(frozen=True)
class Shape:
    """The sizes that distinguish one Mistral-architecture model from another."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32002
    context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_params(self) -> int:
        hd = self.head_dim
        per_layer = (
            2 * self.hidden * self.heads * hd
            + 2 * self.hidden * self.kv_heads * hd
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden
        )
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden


#: Every dimension a multiple of 256, so K-quants apply without fallbacks.
SHAPES: dict[str, Shape] = {
    "tiny": Shape(hidden=256, layers=2, heads=2, kv_heads=1, intermediate=512),
    "0.5b": Shape(hidden=1024, layers=32, heads=8, kv_heads=2, intermediate=3584),
    "1b": Shape(hidden=2048, layers=20, heads=16, kv_heads=4, intermediate=5632),
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336),
}

ADDED_TOKENS = {"<|end_of_turn|>": 32000, "<|pad_0|>": 32001}
#: Elements generated at random per tensor; larger tensors repeat a random block (fast).
_RANDOM_BLOCK = 1 << 22


class SyntheticError(StarlingError):
    """A synthetic model could not be made."""


def mistral_tokenizer_model() -> Path:
    """The Mistral v1 `tokenizer.model` shipped inside the `mistral-common` wheel
    (or the file `STARLING_MISTRAL_TOKENIZER` names)."""
    override = environment().mistral_tokenizer
    if override is not None:
        return override
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise SyntheticError(
            "synthetic models need the real Mistral tokenizer: pip install mistral-common "
            "(it is in starling-local's 'test' extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise SyntheticError(f"{path} is missing from the installed mistral-common")
    return path


def hf_config(shape: Shape) -> dict[str, Any]:
    """config.json as Starling-LM-7B's, with `shape`'s sizes."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.context,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def hf_tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and shapes of every weight, in checkpoint order."""
    hd, h = shape.head_dim, shape.hidden
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (shape.heads * hd, h)),
            (p + "self_attn.k_proj.weight", (shape.kv_heads * hd, h)),
            (p + "self_attn.v_proj.weight", (shape.kv_heads * hd, h)),
            (p + "self_attn.o_proj.weight", (h, shape.heads * hd)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return specs


def random_weight(name: str, shape: tuple[int, ...], seed: int) -> npt.NDArray[np.float32]:
    """Deterministic random values: norms near 1, embeddings N(0, 1), projections
    N(0, 1/fan_in) so activations and attention scores stay O(1)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n = int(np.prod(shape))
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)
    std = 1.0 if "embed_tokens" in name else 1.0 / np.sqrt(shape[1])
    block = rng.standard_normal(min(n, _RANDOM_BLOCK), dtype=np.float32)
    block *= np.float32(std)
    values = block if n <= _RANDOM_BLOCK else np.resize(block, n)
    return values.reshape(shape)


_STEER = 8.0


def _steer_end_of_turn(
    name: str, weight: npt.NDArray[np.float32], logit: float
) -> npt.NDArray[np.float32]:
    if name == "model.embed_tokens.weight":
        weight = weight.copy()
        weight[:, 0] = _STEER
    elif name == "lm_head.weight":
        weight = weight.copy()
        weight[:, 0] = 0.0
        weight[ADDED_TOKENS["<|end_of_turn|>"]] = 0.0
        # After RMSNorm, dimension 0 is about _STEER / rms(x) ~ sqrt(hidden) * 0.44.
        weight[ADDED_TOKENS["<|end_of_turn|>"], 0] = logit / (
            _STEER / np.sqrt(1 + _STEER**2 / weight.shape[1])
        )
    return weight


def write_tokenizer_files(outdir: Path) -> None:
    """Starling's tokenizer files, alpha's stray `<sep>` sep_token included."""
    shutil.copyfile(mistral_tokenizer_model(), outdir / "tokenizer.model")
    (outdir / "added_tokens.json").write_text(json.dumps(ADDED_TOKENS, indent=2))
    (outdir / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "<|end_of_turn|>",
                "pad_token": "<|end_of_turn|>",
                "sep_token": "<sep>",
                "unk_token": "<unk>",
            },
            indent=2,
        )
    )
    decoder = {
        str(i): {
            "content": text,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for text, i in {"<unk>": 0, "<s>": 1, "</s>": 2, **ADDED_TOKENS}.items()
    }
    (outdir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "added_tokens_decoder": decoder,
                "bos_token": "<s>",
                "chat_template": OPENCHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|end_of_turn|>",
                "legacy": True,
                "model_max_length": 1000000000000000019884624838656,
                "pad_token": "<|end_of_turn|>",
                "sep_token": "<sep>",
                "spaces_between_special_tokens": False,
                "tokenizer_class": "LlamaTokenizer",
                "unk_token": "<unk>",
                "use_default_system_prompt": True,
            },
            indent=2,
        )
    )


def make_checkpoint(
    outdir: Path,
    shape: Shape = SHAPES["tiny"],
    *,
    seed: int = 0,
    shards: int = 2,
    eot_logit: float | None = None,
    distinct_logits: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write a Starling-shaped Hugging Face checkpoint (bf16 safetensors, sharded, indexed).

    `eot_logit` makes a model that ends its turns: hidden dimension 0 is held large in every
    embedding and `<|end_of_turn|>`'s output row reads only that dimension, so the logit of
    id 32000 sits near `eot_logit` at every position (random logits are about N(0, 1)).

    Large tensors repeat one random block, so some output rows are equal and their tokens' logits
    tie exactly; programs break such ties differently. `distinct_logits` gives every output row
    its own offset (for comparing the token ids of two programs).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
    (outdir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 0}, indent=2)
    )
    write_tokenizer_files(outdir)
    specs = hf_tensor_specs(shape)
    shards = max(1, min(shards, len(specs)))
    per = -(-len(specs) // shards)
    weight_map: dict[str, str] = {}
    total = sum(int(np.prod(s)) * 2 for _, s in specs)
    shapes = dict(specs)
    done = 0

    def produce(name: str) -> Any:
        nonlocal done
        weight = random_weight(name, shapes[name], seed)
        if distinct_logits and name == "lm_head.weight":
            rng = np.random.default_rng([seed, 1])
            scale = np.float32(1.0 / np.sqrt(weight.shape[1]))
            weight = weight + rng.standard_normal((weight.shape[0], 1), dtype=np.float32) * scale
        if eot_logit is not None:
            weight = _steer_end_of_turn(name, weight, eot_logit)
        bits = to_bf16_bits(weight)
        done += bits.nbytes
        if progress:
            progress(done, total, name)
        return bits

    for k in range(shards):
        part = specs[k * per : (k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"

        write_safetensors(outdir / fname, [(n, "BF16", s) for n, s in part], produce)
        weight_map.update({n: fname for n, _ in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (outdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (outdir / "starling-synthetic.json").write_text(json.dumps({**asdict(shape), "seed": seed}))
    return outdir


def make_gguf(
    out: Path,
    shape: Shape,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Write a Starling-shaped F16 GGUF directly (no safetensors step): for benchmarks of
    large shapes, where only the speed of the result matters."""
    from starling_local.acquire.convert import (
        Hyperparams,
        OutType,
        PlannedTensor,
        load_vocabulary,
        write_gguf,
    )

    hp = Hyperparams.from_config(hf_config(shape))
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        vocab = load_vocabulary(Path(tmp), shape.vocab)
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.layers)
    planned = []
    for name, dims in hf_tensor_specs(shape):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
        out_dtype = "f32" if len(dims) == 1 else "f16"

        def load(name: str = name, dims: tuple[int, ...] = dims) -> npt.NDArray[np.float32]:
            return random_weight(name, dims, seed)

        planned.append(PlannedTensor(gguf_name, dims, out_dtype, load))
    return write_gguf(
        out, hp, vocab, planned, OutType.F16, progress, name=f"synthetic-{shape.hidden}"
    )


def make_vocab_gguf(out: Path) -> Path:
    """Write Starling's vocabulary alone as a GGUF (7B hyperparameters, no tensors): enough for
    llama.cpp to tokenize exactly as Starling does, with no model downloaded (remote engines,
    `starling render --tokens`). Needs the tokenizer from the `mistral-common` wheel."""
    from starling_local.acquire.convert import Hyperparams, OutType, load_vocabulary, write_gguf

    shape = SHAPES["7b"]
    hp = Hyperparams.from_config(hf_config(shape))
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        vocab = load_vocabulary(Path(tmp), shape.vocab)
    return write_gguf(out, hp, vocab, [], OutType.F16, None, name="starling-vocab")
