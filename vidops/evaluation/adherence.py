"""Prompt adherence of a shapes model: generate for a fixed prompt set, read the pixels back.

The prompt set mixes training combinations with held-out ones (never generated for training,
`vidops.data.samples.HOLDOUT`), so the scores separate learning the captions seen from
composing colour, shape and direction anew.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vidops.data.samples import HOLDOUT, caption_for, training_combos
from vidops.evaluation.shapes import parse_prompt, read_shape_video
from vidops.models.folder import LoadedModel
from vidops.models.sampling import generate, save_video


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    seed: int
    held_out: bool


def shapes_prompts(count: int = 24, held_out_fraction: float = 1 / 3, seed: int = 0
                   ) -> list[PromptCase]:
    """`count` prompts, `held_out_fraction` of them held-out combos (cycled), the rest
    training combos spread evenly over colours and directions; each with its own seed."""
    rng = np.random.default_rng(seed)
    held = round(count * held_out_fraction)
    cases = [PromptCase(caption_for(*HOLDOUT[i % len(HOLDOUT)]), 1000 + i, True)
             for i in range(held)]
    combos = list(training_combos("shapes"))
    order = rng.permutation(len(combos))
    # Round-robin over (colour, direction) so every colour and direction is asked equally.
    by_pair: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for i in order:
        colour, _, direction = combos[i]
        by_pair.setdefault((colour, direction), []).append(combos[i])
    pairs = sorted(by_pair)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    picked: list[tuple[str, str, str]] = []
    while len(picked) < count - held:
        for pair in pairs:
            if by_pair[pair] and len(picked) < count - held:
                picked.append(by_pair[pair].pop())
    cases += [PromptCase(caption_for(*combo), 2000 + i, False) for i, combo in enumerate(picked)]
    return cases


def evaluate_adherence(
    model: LoadedModel,
    cases: list[PromptCase],
    *,
    steps: int,
    guidance_scale: float,
    sampler: str,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Generate every case (one at a time: a video depends on its own seed only, not on
    batch neighbours) and score colour, direction, shape; MP4s into out_dir if given."""
    rows = []
    for i, case in enumerate(cases):
        video = generate(model, [case.prompt], seed=case.seed, steps=steps,
                         guidance_scale=guidance_scale, sampler=sampler)[0]
        reading = read_shape_video(video)
        colour, shape, direction = parse_prompt(case.prompt)
        rows.append({**asdict(case), "colour": reading.colour == colour,
                     "direction": reading.direction == direction,
                     "shape": reading.shape == shape, "read": asdict(reading)})
        if out_dir is not None:
            save_video(video, Path(out_dir) / f"{i:02d}-{case.prompt.replace(' ', '_')}.mp4",
                       model.fps)
    held = [r for r in rows if r["held_out"]]

    def rate(items: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([r[key] for r in items])) if items else float("nan")

    return {
        "prompts": len(rows),
        "colour": rate(rows, "colour"),
        "direction": rate(rows, "direction"),
        "shape": rate(rows, "shape"),
        "held_out": len(held),
        "held_out_both": (float(np.mean([r["colour"] and r["direction"] for r in held]))
                          if held else float("nan")),
        "rows": rows,
    }
