"""ai-toolkit's sample-prompt processing, reproduced exactly (aitk-sampling.md §B.2-§B.4).

Order in ai-toolkit: trigger injection on the raw string, then `strip()` and `--flag` parsing
(GenerateImageConfig._process_prompt_string), then width/height floored to 8 with a minimum of 64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class PromptFlagError(ValueError):
    """An inline `--flag` has a value ai-toolkit cannot parse (it would crash sampling)."""


@dataclass(frozen=True)
class PromptFlags:
    """A prompt with its inline flags parsed out; None means the flag was not given."""

    prompt: str
    neg: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    sample_steps: int | None = None
    network_multiplier: float | None = None
    ctrl_img: str | None = None
    dropped: tuple[str, ...] = field(default=())
    """Flags ai-toolkit parses but that change nothing for these models, or that it ignores."""


# flag -> (PromptFlags field, parser); every alias ai-toolkit accepts.
_FLAGS = {
    "n": ("neg", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "seed": ("seed", int),
    "l": ("guidance_scale", float),
    "cfg": ("guidance_scale", float),
    "s": ("sample_steps", int),
    "steps": ("sample_steps", int),
    "m": ("network_multiplier", float),
    "network_multiplier": ("network_multiplier", float),
    "ctrl_img": ("ctrl_img", str),
}


def inject_trigger(prompt: str, trigger_word: str | None) -> str:
    """`[trigger]` and `[name]` -> trigger word, only when one is set (None leaves them literal).

    ai-toolkit calls inject_trigger_into_prompt(add_if_not_present=False): nothing is prepended.
    """
    if trigger_word is None:
        return prompt
    return prompt.replace("[name]", trigger_word).replace("[trigger]", trigger_word)


def parse_prompt_flags(prompt: str) -> PromptFlags:
    """Split `prompt` at every `--` the way ai-toolkit does; the last occurrence of a flag wins."""
    pieces = prompt.strip().split("--")
    values: dict[str, object] = {}
    dropped: list[str] = []
    for piece in pieces[1:]:
        flag = piece.split(" ")[0].strip()
        content = piece[len(flag):].strip()
        if flag not in _FLAGS:
            dropped.append(flag)
            continue
        name, parse = _FLAGS[flag]
        try:
            # int("1.5") fails in ai-toolkit too; keep its strictness so sizes mean the same.
            values[name] = parse(content)
        except ValueError:
            kind = "an integer" if parse is int else "a number"
            raise PromptFlagError(f"--{flag}: expected {kind}, got {content!r}") from None
    return PromptFlags(prompt=pieces[0].strip(), dropped=tuple(dropped), **values)  # type: ignore[arg-type]


def floor_size(value: int) -> int:
    """GenerateImageConfig: floor to a multiple of 8, at least 64."""
    return max(64, value - value % 8)


RANDOM_SEED = -1
"""GenerateImageConfig draws a random seed for -1, but only for the seed it is given: a `--seed -1`
flag is parsed afterwards and stays a fixed seed (config_modules.py:1165 vs :1192)."""
TORCH_SEEDS = range(-2**63, 2**64)
"""What torch.manual_seed accepts; ai-toolkit crashes on anything else."""


def torch_seed(seed: int) -> int:
    """The seed torch.manual_seed really uses: it reads a negative one as its 64-bit two's
    complement (-1 -> 2**64 - 1). Raises ValueError where torch refuses the seed."""
    if seed not in TORCH_SEEDS:
        raise ValueError(f"{seed} is outside what torch.manual_seed accepts (-2**63 to 2**64 - 1)")
    return seed % 2**64


def aitk_seeds(base_seed: int, walk_seed: bool, item_seeds: Sequence[int | None]) -> list[int]:
    """ai-toolkit's seed per sample (§B.2): an item's own seed persists to later items unless walking."""
    seeds = []
    current = base_seed
    for i, item_seed in enumerate(item_seeds):
        if walk_seed:
            current = base_seed + i
        if item_seed is not None:
            current = item_seed
        seeds.append(current)
    return seeds
