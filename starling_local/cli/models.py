"""`starling pull`, `starling models`, `starling inspect`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from starling_local.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("pull", help="download a Starling GGUF from the Hugging Face Hub")
    p.add_argument(
        "name",
        nargs="?",
        help="starling-lm-7b-alpha[:QUANT], starling-lm-7b-beta[:QUANT], "
        "owner/repo/file.gguf, or a local .gguf (default: starling-lm-7b-alpha:Q4_K_M)",
    )
    p.add_argument("--quant", "-q", help="quantization, e.g. Q4_K_M (see --list)")
    p.add_argument("--source", choices=["huggingface", "modelscope"], default="huggingface")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--list", action="store_true", help="list the available quantizations")
    p.add_argument("--json", action="store_true", help="print the library entry as JSON")
    p.set_defaults(handler=run_pull)

    m = sub.add_parser("models", help="list local models; `models rm NAME` removes one")
    m.add_argument("action", nargs="?", choices=["list", "rm"], default="list")
    m.add_argument("name", nargs="?")
    m.add_argument("--json", action="store_true")
    m.set_defaults(handler=run_models)

    i = sub.add_parser("inspect", help="check a GGUF for what Starling needs (and fix it)")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true")
    i.add_argument("--fix", type=Path, metavar="OUT.gguf", help="write a corrected copy")
    i.set_defaults(handler=run_inspect)


def run_pull(args: argparse.Namespace) -> int:
    from starling_local.acquire.catalog import parse_model_ref
    from starling_local.acquire.library import ModelLibrary
    from starling_local.acquire.pull import pull
    from starling_local.acquire.quantize import DEFAULT_QUANT
    from starling_local.files import human_bytes
    from starling_local.progress import ProgressLine

    if args.list:
        ref = parse_model_ref(args.name.split(":", 1)[0] if args.name else None)
        library = ModelLibrary()
        approx = "" if ref.model.gguf.exact_sizes else "~"
        print(f"{ref.model.title}\n{ref.model.gguf.repo_id}")
        for q, size in ref.model.gguf.sizes.items():
            here = " (pulled)" if library.find(f"{ref.model.name}:{q}") else ""
            default = " (default)" if q == DEFAULT_QUANT else ""
            print(f"  {q:<8} {approx}{human_bytes(size):>10}{default}{here}")
        return 0
    entry = pull(
        args.name,
        quant=args.quant,
        source=args.source,
        revision=args.revision,
        progress_factory=ProgressLine,
    )
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(entry), indent=2))
    else:
        check = "sha256 verified" if entry.verified else "not verified"
        print(f"{entry.name}  {human_bytes(entry.size)}  {check}\n{entry.path}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from starling_local.acquire.library import ModelLibrary
    from starling_local.files import human_bytes

    library = ModelLibrary()
    if args.action == "rm":
        if not args.name:
            raise UsageError("usage: starling models rm NAME")
        removed = library.remove(args.name)
        if removed.owned:
            print(f"removed {removed.name} (deleted {removed.path})")
        else:
            print(f"removed {removed.name} from the library (your file stays: {removed.path})")
        return 0
    entries = library.entries()
    if args.json:
        print(json.dumps([{**asdict(e), "present": e.exists} for e in entries], indent=2))
        return 0
    if not entries:
        print("no local models yet: `starling pull` downloads Starling-LM-7B-alpha (Q4_K_M)")
        return 0
    width = max(len(e.name) for e in entries)
    for e in sorted(entries, key=lambda e: e.name):
        flag = "verified" if e.verified else "unverified"
        if not e.exists:
            flag = "MISSING"
        print(
            f"{e.name:<{width}}  {e.quant:<7} {human_bytes(e.size):>10}  {flag:<10}  "
            f"{e.source:<11}  {e.path}"
        )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from starling_local.files import human_bytes
    from starling_local.gguf.edit import fix_starling_gguf
    from starling_local.gguf.info import read_gguf

    info = read_gguf(args.file)
    problems = info.problems()
    if info.architecture != "llama":
        problems.insert(0, f"architecture {info.architecture!r} is not supported")
    report = {
        "path": str(info.path),
        "size": info.size,
        "name": info.name,
        "architecture": info.architecture,
        "quant": info.quant,
        "tensor_types": info.tensor_types,
        "parameters": info.n_params,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
        "bos_id": info.bos_id,
        "eos_id": info.eos_id,
        "eot_id": info.eot_id,
        "token_32000": list(info.special_tokens.get(32000, ("", ""))),
        "token_32001": list(info.special_tokens.get(32001, ("", ""))),
        "chat_template": info.chat_template is not None,
        "chat_template_openchat": info.template_ok,
        "problems": problems,
        "ok": not problems,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rows = [
            ("file", f"{info.path} ({human_bytes(info.size)})"),
            ("architecture", info.architecture),
            ("quantization", f"{info.quant} ({', '.join(info.tensor_types)})"),
            ("parameters", f"{info.n_params / 1e9:.2f} B"),
            ("context length", info.context_length),
            ("eos / eot", f"{info.eos_id} / {info.eot_id}"),
            ("token 32000", " ".join(map(str, info.special_tokens.get(32000, ("-",))))),
            ("token 32001", " ".join(map(str, info.special_tokens.get(32001, ("-",))))),
            (
                "chat template",
                "OpenChat 3.5" if info.template_ok else ("other" if info.chat_template else "none"),
            ),
        ]
        for key, value in rows:
            print(f"{key:<15} {value}")
        for problem in problems:
            print(f"problem: {problem}")
        if problems and not args.fix:
            print(
                "starling-local compensates for eos at load time; "
                f"`starling inspect {args.file} --fix OUT.gguf` writes a corrected copy"
            )
    if args.fix:
        changed = fix_starling_gguf(args.file, args.fix)
        if changed:
            print(f"wrote {args.fix}: " + "; ".join(changed), file=sys.stderr)
        else:
            print("nothing to fix", file=sys.stderr)
    return 0
