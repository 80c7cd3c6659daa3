"""Speculative (prompt-lookup) decoding: drafts verified by the real llama.cpp, on the tiny
Starling model and on SmolLM2, the only trained model reachable here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starling_local.bench.prompts import default_prompts
from starling_local.bench.speculative import render_file_template
from starling_local.chat.template import Message
from starling_local.engine.batch_cost import SIZES, BatchCost
from starling_local.engine.lookup import DraftPolicy, LookupDrafter, best_draft
from starling_local.engine.runtime import Engine
from starling_local.engine.types import GenerationStats, SamplingParams
from tests.cli_helpers import assert_one_line_error, starling
from tests.prompting import generate

FLAT = BatchCost((1.0,) * len(SIZES))
"""A machine where a batch of 16 costs one token (drafting always pays): every match drafts."""

#: Prompts that make the tiny model's drafter find matches (its own replies never repeat).
TINY_PROMPTS = [
    "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat",
    "def f(x):\n    return x + 1\n\ndef f(x):\n    return x + 1\n\nRename f to g.",
    "1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2 3",
    "Hello",
]


def test_the_drafter_copies_what_followed_the_longest_match() -> None:
    #         0  1  2  3  4  5  6  7  8  9 10
    history = [5, 1, 2, 9, 9, 7, 1, 2, 3, 4, 0, 7, 1, 2]
    draft = LookupDrafter(history).draft(3)
    assert draft is not None
    assert draft.tokens == (3, 4, 0)  # "7 1 2" matched at 5-7 (3 tokens), not "1 2" at 1-2
    assert draft.match == 3
    assert LookupDrafter(history).draft(0) is None
    assert LookupDrafter([1, 2, 3, 4]).draft(4) is None  # "3 4" never came before
    grows = LookupDrafter([1, 2, 3, 1, 2])
    assert grows.draft(5) == type(draft)((3, 1, 2), 2)  # up to the end of the history
    grows.append(3)
    assert grows.draft(2) == type(draft)((1, 2), 3)


def test_the_policy_drafts_only_what_the_cost_curve_pays_for() -> None:
    steep = BatchCost((12.0, 20.1, 34.3, 59.7, 109.0)).relative()  # SmolLM2 on this CPU
    flat = FLAT.relative()
    assert flat[1:17] == [1.0] * 16 and steep[2] == pytest.approx(1.675)
    assert best_draft(0.5, flat)[0] == 15  # free verification: draft all there is
    assert best_draft(0.5, steep) == (0, 1.0)  # half right: a batch of 2 costs 1.7 tokens
    assert best_draft(0.98, steep)[0] >= 3
    policy = DraftPolicy(steep)
    assert policy.length(match=12, available=8) > 0  # a long match: likely right
    for _ in range(20):
        policy.record(match=12, drafted=4, accepted=0)
    chances = [policy.length(match=12, available=8) for _ in range(48)]
    assert 0 < sum(k > 0 for k in chances) <= 3  # off, but it keeps looking now and then
    cheap = DraftPolicy(BatchCost((10.0, 10.5, 11.0, 12.0, 14.0)).relative())  # a GPU's curve
    for _ in range(20):
        cheap.record(match=12, drafted=4, accepted=0)
    probes = sum(cheap.length(match=12, available=8) > 0 for _ in range(48))
    assert probes > sum(k > 0 for k in chances)  # where a failed probe costs little: more
    for _ in range(40):
        policy.record(match=12, drafted=4, accepted=4)
    assert policy.length(match=12, available=8) > 0  # and turns back on


def test_relative_cost_is_interpolated_and_never_falls() -> None:
    cost = BatchCost((10.0, 12.0, 11.0, 30.0, 50.0)).relative()
    assert cost[1] == 1.0 and cost[2] == pytest.approx(1.2)
    assert cost[3] == pytest.approx(1.2)  # measured 1.1 at 4: noise, not cheaper
    assert cost[6] == pytest.approx(1.1 + (3.0 - 1.1) / 2)
    assert cost[17] == pytest.approx(5.0 * 17 / 16)
    # The 7B shape on this CPU, every size to 3 timed: a batch of 3 is three single-row passes.
    ms = (317.0, 561.3, 980.0, 564.3, 1297.9, 1628.4)
    seven = BatchCost(tuple(t / 1000 for t in ms), 3, (1, 2, 3, 4, 8, 16))
    assert seven.relative()[3] == pytest.approx(980.0 / 317.0)
    assert best_draft(0.9, seven.relative(), 2)[0] == 1  # not 2: that batch costs 3.1 tokens
    assert seven.as_dict()["k"] == list(SIZES) and seven.as_dict()["ms"][2] == 564.3
    assert seven.as_dict()["all_k"] == [1, 2, 3, 4, 8, 16]


def _reply(
    engine: Engine, text: str, params: SamplingParams, speculate: bool
) -> tuple[list[int], object]:
    """A reply to `text` after an earlier exchange (whose turn markers give the drafter
    matches from the first token on), from an empty cache."""
    engine.speculate = speculate
    engine.clear_cache()
    history = [Message("user", "Say it."), Message("assistant", text), Message("user", text)]
    reply = generate(engine, history, params=params)
    reply.stream.consume()
    return reply.stream.token_ids, reply.stream.stats


@pytest.fixture
def distinct(distinct_q8: Path) -> Engine:
    eng = Engine(distinct_q8, n_ctx=2048, speculate=True)
    eng.use_batch_cost(FLAT)
    yield eng  # type: ignore[misc]
    eng.close()


def test_greedy_speculative_replies_are_token_identical_on_the_tiny_model(
    distinct: Engine,
) -> None:
    """The tiny model with no near-ties: every drafted token that is kept is the model's own
    greedy choice, so the ids are those of plain decoding."""
    greedy = SamplingParams(temperature=0.0, max_tokens=200)
    drafted = accepted = 0
    for text in TINY_PROMPTS:
        plain, _ = _reply(distinct, text, greedy, speculate=False)
        fast, stats = _reply(distinct, text, greedy, speculate=True)
        assert fast == plain, text
        drafted += stats.draft_tokens  # type: ignore[attr-defined]
        accepted += stats.accepted_tokens  # type: ignore[attr-defined]
    assert 0 < accepted < drafted  # drafts were both kept and thrown away


def test_sampling_draws_once_per_token_as_plain_decoding_does(distinct: Engine) -> None:
    """With sampling, each position is drawn from the model's own distribution by the same
    sampler chain, one draw per emitted token: a seeded speculative reply is the plain one
    (but where a draw lands within rounding distance of a boundary between two tokens)."""
    same = drafted = 0
    seeds = range(12)
    for seed in seeds:
        params = SamplingParams(temperature=0.5, max_tokens=40, seed=seed, ignore_eos=True)
        plain, _ = _reply(distinct, TINY_PROMPTS[0], params, speculate=False)
        fast, stats = _reply(distinct, TINY_PROMPTS[0], params, speculate=True)
        same += fast == plain
        drafted += stats.draft_tokens  # type: ignore[attr-defined]
    assert drafted > 0
    assert same >= len(seeds) - 2


def test_the_kv_cache_holds_exactly_the_kept_tokens(distinct: Engine, tmp_path: Path) -> None:
    """Rejected drafts leave the cache: the next turn reuses it (and its saved state file) up
    to the reply, and continues exactly as a plain engine that evaluated everything."""
    greedy = SamplingParams(temperature=0.0, max_tokens=120)
    first = [Message("user", TINY_PROMPTS[1])]
    distinct.speculate = True
    distinct.clear_cache()
    reply = generate(distinct, first, params=greedy)
    reply.stream.consume()
    assert reply.stream.stats.draft_tokens > reply.stream.stats.accepted_tokens > 0
    prompt = reply.prompt.tokens
    cached = distinct.cached_tokens
    assert cached >= len(prompt) + len(reply.stream.token_ids) - 1
    assert distinct.cached_prefix(prompt + reply.stream.token_ids) >= cached - 1
    state = tmp_path / "kv.bin"
    assert distinct.save_state(state) > 0

    second = [
        *first,
        Message("assistant", reply.stream.text, tuple(reply.stream.token_ids)),
        Message("user", "and again"),
    ]
    assert distinct.load_state(state) == cached
    resumed = generate(distinct, second, params=greedy)
    resumed.stream.consume()
    assert resumed.stream.stats.prompt_evaluated < 20  # only the new turn
    distinct.speculate = False
    distinct.clear_cache()
    fresh = generate(distinct, second, params=greedy)
    fresh.stream.consume()
    assert resumed.stream.token_ids == fresh.stream.token_ids


def _plain_then_speculative(
    engine: Engine, tokens: list[int], params: SamplingParams
) -> list[tuple[list[int], GenerationStats]]:
    """The reply's ids and stats, plain then speculative, each from an empty cache."""
    results = []
    for speculate in (False, True):
        engine.speculate = speculate
        engine.clear_cache()
        stream = engine.generate(tokens, params)
        stream.consume()
        results.append((stream.token_ids, stream.stats))
    return results


def test_a_trained_model_gets_drafts_accepted_and_the_same_reply(smollm2: Engine) -> None:
    """SmolLM2 on input-grounded prompts, replies running past 256 cached tokens (where
    llama.cpp's CPU attention with an f16 cache would change method for single tokens): most
    drafted tokens are kept, and every greedy reply is the plain one token for token."""
    greedy = SamplingParams(temperature=0.0, max_tokens=256)
    drafted = accepted = 0
    grounded = [p for p in default_prompts() if p.grounded]
    deepest = 0
    for prompt in grounded:
        tokens = render_file_template(smollm2, prompt.messages)
        (plain, _), (fast, stats) = _plain_then_speculative(smollm2, tokens, greedy)
        drafted += stats.draft_tokens
        accepted += stats.accepted_tokens
        assert fast == plain, prompt.title
        deepest = max(deepest, len(tokens) + len(plain))
    assert deepest > 300
    assert drafted > 300 and accepted / drafted > 0.7


def test_exact_deep_in_a_long_conversation(smollm2: Engine) -> None:
    """A 700-token file to edit: the reply, past 512 cached tokens, is the plain one."""
    code = "\n\n".join(
        f"def handler_{i}(request, limit):\n    items = load(request, {i})\n"
        f"    return [item for item in items if item.size < limit][:{i}]"
        for i in range(16)
    )
    tokens = render_file_template(
        smollm2,
        [
            {
                "role": "user",
                "content": f"{code}\n\nRename `limit` to `max_size` everywhere and "
                "print the whole file.",
            }
        ],
    )
    assert len(tokens) > 600
    greedy = SamplingParams(temperature=0.0, max_tokens=96)
    (plain, _), (fast, stats) = _plain_then_speculative(smollm2, tokens, greedy)
    assert fast == plain
    assert stats.accepted_tokens > 20


def _ask(model: Path, home: Path, *flags: str) -> tuple[dict[str, object], str]:
    r = starling(
        "ask",
        TINY_PROMPTS[0],
        "--model",
        model,
        "--json",
        "--max-tokens",
        "64",
        "--temperature",
        "0",
        "--no-save",
        *flags,
        home=home,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_ask_json_reports_drafts_and_speculation_is_opt_in(
    distinct_q8: Path, starling_home: Path
) -> None:
    """`--speculate` runs under the attention settings that make batches exact (on a CPU:
    flash attention, q8_0 KV cache); plain decoding under the same settings gives the same
    reply token for token."""
    on, on_err = _ask(distinct_q8, starling_home, "--speculate")
    off, _ = _ask(distinct_q8, starling_home, "--kv-type", "q8_0")  # off by default
    assert on["draft_tokens"] > 0 and on["accepted_tokens"] > 0  # type: ignore[operator]
    assert on["draft_limit"] >= 1 and "drafted nothing" not in on_err  # type: ignore[operator]
    assert off["draft_tokens"] == 0 and off["draft_limit"] == 0
    assert on["reply"] == off["reply"]
    bad = starling("ask", "hi", "--model", distinct_q8, "--kv-type", "q8_0", "--no-flash-attn")
    assert_one_line_error(bad, 1, "needs flash attention")
    # The batch-cost curve and exact batch were measured once, for this machine and model.
    curves = json.loads((starling_home / "cache" / "batch-cost.json").read_text())
    assert len(curves) == 1
    entry = next(iter(curves.values()))
    assert set(SIZES) <= set(entry["sizes"]) and len(entry["seconds"]) == len(entry["sizes"])
    # Every size up to the exact batch is timed (costs jump between the standard sizes).
    assert set(range(1, min(entry["exact"], 8) + 1)) <= set(entry["sizes"])
    assert entry["exact"] >= on["draft_limit"] + 1  # type: ignore[operator]


def test_no_drafts_where_no_batch_is_exact(
    distinct_q8: Path, distinct_f16: Path, starling_home: Path
) -> None:
    """Where a batch's logits are not bit for bit a single token's, nothing is drafted (a
    draft could change the reply) and `ask` says why. Measured by the engine: with this
    build, F16 weights go through llamafile's GEMM for any batch of two or more tokens."""
    eng = Engine(distinct_q8, n_ctx=1024, speculate=True)
    try:
        assert eng.batch_cost().exact >= 2
        eng.use_batch_cost(BatchCost((1.0,) * len(SIZES), exact=1))  # can only lower it
        greedy = SamplingParams(temperature=0.0, max_tokens=64)
        fast, stats = _reply(eng, TINY_PROMPTS[0], greedy, speculate=True)
        plain, _ = _reply(eng, TINY_PROMPTS[0], greedy, speculate=False)
        assert stats.draft_tokens == 0 and stats.draft_limit == 0  # type: ignore[attr-defined]
        assert fast == plain
    finally:
        eng.close()
    out, err = _ask(distinct_f16, starling_home, "--speculate")
    if out["draft_limit"] == 0:
        assert out["draft_tokens"] == 0
        notes = [line for line in err.splitlines() if "drafted nothing" in line]
        assert len(notes) == 1 and notes[0].startswith("starling: note:"), err
        assert "Traceback" not in err
    else:  # a build that batches F16 exactly
        assert "drafted nothing" not in err


def test_the_batch_cost_curve_is_measured_once_per_machine_and_model(tiny_q4: Path) -> None:
    first = Engine(tiny_q4, n_ctx=512, speculate=True)
    curve = first.batch_cost()
    first.close()
    again = Engine(tiny_q4, n_ctx=512, speculate=True)
    try:
        assert again.batch_cost() == curve  # read back, not measured again (timings vary)
        assert again.batch_cost(fresh=True) != curve
    finally:
        again.close()


def test_bench_speculative_with_a_prompts_file(
    smollm2_gguf: Path, tmp_path: Path, starling_home: Path
) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": "Repeat exactly: alpha beta gamma delta."}
                    ],
                    "grounded": True,
                },
                {"messages": [{"role": "user", "content": "Say hi."}], "grounded": False},
            ]
        )
    )
    out = tmp_path / "spec.json"
    r = starling(
        "bench",
        "--speculative",
        "--model",
        smollm2_gguf,
        "--prompts",
        prompts,
        "--tokens",
        "64",
        "--json",
        out,
        home=starling_home,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())["speculative"]
    assert figures["prompts"] == 1  # the totals cover the grounded ones
    assert len(figures["runs"]) == 2
    assert {"speedup", "acceptance", "identical"} <= set(figures)
    assert figures["batch_cost"]["k"] == list(SIZES)
    assert "speedup" in r.stdout and "identical" in r.stdout

    prompts.write_text('[{"messages": "hi"}]')
    bad = starling(
        "bench", "--speculative", "--model", smollm2_gguf, "--prompts", prompts, home=starling_home
    )
    assert_one_line_error(bad, 1, 'expected "messages"')
    missing = starling("bench", "--speculative", home=starling_home)
    assert_one_line_error(missing, 2, "--speculative needs --model")
    attention = starling("bench", "--long-context", "tiny", "--attention", "fa", home=starling_home)
    assert_one_line_error(attention, 2, "--attention: choose from")
    depths = starling("bench", "--long-context", "tiny", "--depths", "0,abc", home=starling_home)
    assert depths.returncode == 2 and "Traceback" not in depths.stderr
    assert "not a comma-separated list of numbers" in depths.stderr


@pytest.mark.parametrize("command", ["ask", "chat", "serve"])
def test_every_command_that_generates_takes_the_speculate_flags(command: str) -> None:
    from starling_local.cli import build_parser
    from starling_local.cli.common import engine_spec

    extra = ["hi"] if command == "ask" else []
    parse = build_parser().parse_args
    assert engine_spec(parse([command, *extra, "--speculate"])).speculate is True
    assert engine_spec(parse([command, *extra, "--no-speculate"])).speculate is False
    assert engine_spec(parse([command, *extra])).speculate is None  # off, or the app's choice
