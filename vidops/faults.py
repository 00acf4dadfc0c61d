"""Fault injection: kill a stage the hard way at a chosen point, to prove a re-run recovers.

    VIDOPS_FAULT=<point>[@<n>][,<point>[@<n>]...]

SIGKILLs the process (what an OOM kill, a pod eviction or a lost node does: no handler,
no cleanup) the n-th time it passes <point> (n defaults to 1). The crash-safety tests
(tests/reliability/test_kill_points.py) and reliability drills set it; unset, a point costs
one environment lookup. The points:

- `<stage>.item`: after each item a data stage has processed (`ingest`, `filter`,
  `annotate`, `encode`; `evaluate` after each batch of videos): every update of the
  stage's progress bar (`vidops.stage.ItemProgress`);
- `train.step`: after each optimizer step of pretrain or fine-tune (and a checkpoint due
  then);
- the stage contract's publishing steps, for every data stage: `<stage>.written` (tables
  written, not validated), `<stage>.versioned` (DVC add and push done, stage.json not yet
  written), `<stage>.committed` (output renamed into place, MLflow run not yet ended);
- `register.logged`: the model logged to the register run, not yet a registry version;
  `register.created`: the version created (with its tags), the `challenger` alias not yet
  set.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from functools import lru_cache

ENV = "VIDOPS_FAULT"

_passes: Counter[str] = Counter()


@lru_cache(maxsize=8)  # a point is passed once per item or step: parse a spec once
def parse(spec: str) -> dict[str, int]:
    """`filter.item@2,train.step` -> {"filter.item": 2, "train.step": 1}."""
    targets: dict[str, int] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = entry.partition("@")
        if not name or (count and not (count.isdigit() and int(count) >= 1)):
            raise ValueError(f"{ENV}: {entry!r} is not <point>[@<n>] with n >= 1")
        targets[name] = int(count or 1)
    return targets


def point(name: str) -> None:
    """Pass the fault point `name`: dies here when VIDOPS_FAULT says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _passes[name] += 1
    if parse(spec).get(name) == _passes[name]:
        sys.stderr.write(f"vidops: {ENV}: SIGKILL at {name} (pass {_passes[name]})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
