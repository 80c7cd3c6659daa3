"""Write the vocabulary-only Starling GGUF shipped in the package.

    python scripts/make_vocab_gguf.py [OUT]   (default: starling_local/data/starling-vocab.gguf)

Built from the Mistral v1 tokenizer in the `mistral-common` wheel plus Starling's two added
tokens (`<|end_of_turn|>` = 32000, `<|pad_0|>` = 32001); tests prove the model card's token
lists with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starling_local.acquire.synthetic import make_vocab_gguf

DEFAULT = Path(__file__).resolve().parents[1] / "starling_local" / "data" / "starling-vocab.gguf"

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    print(make_vocab_gguf(out))
