"""A conversation's settings as one typed value, and the one place they meet the store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from starling_local.chat.template import Mode, PromptStyle, SystemPolicy
from starling_local.engine.types import SamplingParams
from starling_local.errors import UsageError
from starling_local.store.models import Conversation

#: Fields of one request that a conversation never keeps (`ignore_eos` is for benchmarks; a
#: grammar, logit bias or logprobs belong to the request that asked for them).
PER_REQUEST = ("ignore_eos", "logit_bias", "grammar", "logprobs", "prompt_logprobs")
#: Sampling fields a conversation keeps.
SAVED_SAMPLING = tuple(f.name for f in fields(SamplingParams) if f.name not in PER_REQUEST)


@dataclass(frozen=True)
class ConversationSettings:
    """How a conversation is rendered and sampled."""

    mode: Mode = Mode.CHAT
    system: str = ""
    policy: SystemPolicy = SystemPolicy.NATIVE
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def style(self) -> PromptStyle:
        return PromptStyle(self.mode, self.policy)

    def with_sampling(self, **changes: Any) -> ConversationSettings:
        """These settings with some sampling fields changed (unknown names are refused)."""
        unknown = set(changes) - {f.name for f in fields(SamplingParams)}
        if unknown:
            raise UsageError(f"unknown sampling setting {sorted(unknown)[0]!r}")
        return replace(self, sampling=replace(self.sampling, **changes))


def settings_of(conversation: Conversation) -> ConversationSettings:
    """The settings a conversation was saved with (defaults for what it does not say)."""
    params = conversation.params
    sampling = SamplingParams(**{k: params[k] for k in SAVED_SAMPLING if k in params})
    policy = params.get("system_policy", SystemPolicy.NATIVE.value)
    try:
        return ConversationSettings(
            Mode(conversation.mode), conversation.system, SystemPolicy(policy), sampling
        )
    except ValueError as exc:
        raise UsageError(f"conversation {conversation.id}: unreadable settings ({exc})") from exc


def stored_params(settings: ConversationSettings) -> dict[str, Any]:
    """The `params` column: the saved sampling fields and the system policy."""
    data = {k: v for k, v in asdict(settings.sampling).items() if k in SAVED_SAMPLING}
    data["system_policy"] = settings.policy.value
    return data


def with_flags(settings: ConversationSettings, **flags: Any) -> ConversationSettings:
    """`settings` with the options a user gave explicitly (None: not given, keep the saved)."""
    given = {k: v for k, v in flags.items() if v is not None}
    out = settings
    if "mode" in given:
        out = replace(out, mode=Mode(given.pop("mode")))
    if "system" in given:
        out = replace(out, system=given.pop("system").strip())
    if "system_policy" in given:
        out = replace(out, policy=SystemPolicy(given.pop("system_policy")))
    return out.with_sampling(**given) if given else out


#: What a conversation's saved settings may hold: (type, low, high).
_RANGES: dict[str, tuple[type | tuple[type, ...], float, float]] = {
    "temperature": ((int, float), 0.0, 2.0),
    "top_p": ((int, float), 0.0, 1.0),
    "top_k": (int, 0, 1 << 20),
    "min_p": ((int, float), 0.0, 1.0),
    "repeat_penalty": ((int, float), 0.0, 10.0),
    "frequency_penalty": ((int, float), -2.0, 2.0),
    "presence_penalty": ((int, float), -2.0, 2.0),
    "max_tokens": (int, 1, 1 << 20),
    "seed": (int, -(2**63), 2**64 - 1),
}


def check_params(params: Any, where: str) -> dict[str, Any]:
    """Saved settings from outside (an import), checked: one line naming a bad one. Unknown
    keys are dropped; a `None` seed means random."""
    if not isinstance(params, dict):
        raise UsageError(f"{where}: 'params' must be an object")
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "system_policy":
            if value not in [p.value for p in SystemPolicy]:
                raise UsageError(f"{where}: system_policy must be native or hub, not {value!r}")
            out[key] = value
        elif key in _RANGES:
            if key == "seed" and value is None:
                out[key] = None
                continue
            kind, low, high = _RANGES[key]
            number = isinstance(value, kind) and not isinstance(value, bool)
            if not number or not low <= float(value) <= high:
                raise UsageError(
                    f"{where}: {key} must be a number from {low:g} to {high:g}, not {value!r}"
                )
            out[key] = value
    return out
