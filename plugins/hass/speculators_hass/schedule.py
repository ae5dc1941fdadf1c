"""The published two-stage HASS recipe, as ``speculators train`` runs.

HASS's ``train.sh`` trains in two stages: stage 1 without the top-K distillation term
(``--topk_w 0``, 40 epochs, learning rate 3e-5), then stage 2 fine-tunes the stage-1 weights
with it (``--topk_w 1``, 10 epochs, learning rate 1e-5), both with AdamW betas (0.9, 0.95) and a
1 % linear warm-up. The core trainer runs one stage per run, so the recipe is two runs: the
second starts from the first one's ``final/`` folder through the ``init_from`` algorithm option::

    speculators train --algorithm eagle --verifier V --data STORE --output run/stage1 \\
        --num-epochs 40 --learning-rate 3e-5 --optimizer-kwargs '{"betas": [0.9, 0.95]}' \\
        --algo-opt topk_w=0
    speculators train --algorithm eagle --verifier V --data STORE --output run/stage2 \\
        --num-epochs 10 --learning-rate 1e-5 --optimizer-kwargs '{"betas": [0.9, 0.95]}' \\
        --algo-opt topk_w=1 --algo-opt init_from=run/stage1/final

:func:`two_stage_commands` builds those command lines; :func:`two_stage_schedule` gives the
stages as data (for a Python loop over :class:`~speculators_core.train.Trainer`). Differences
from HASS's script that remain: the core trainer clips the gradient *norm*
(``--max-grad-norm``), not each gradient value at 0.5, and counts epochs from 1 (HASS's loop runs
``epoch + 1`` passes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from speculators_core import SpeculatorsError

__all__ = ["HASS_BETAS", "HassStage", "two_stage_commands", "two_stage_schedule"]

#: AdamW betas of the published recipe.
HASS_BETAS: tuple[float, float] = (0.9, 0.95)


@dataclass(frozen=True)
class HassStage:
    """One training run of the recipe: its name, length, learning rate and top-K weight.

    ``init_from_previous``: the run starts from the previous stage's ``final/`` weights.
    """

    name: str
    num_epochs: int
    learning_rate: float
    topk_w: float
    init_from_previous: bool = False


def two_stage_schedule(
    *,
    stage1_epochs: int = 40,
    stage2_epochs: int = 10,
    stage1_learning_rate: float = 3e-5,
    stage2_learning_rate: float = 1e-5,
) -> tuple[HassStage, HassStage]:
    """The two stages of the published recipe (defaults: HASS's ``train.sh``)."""
    return (
        HassStage("stage1", stage1_epochs, stage1_learning_rate, topk_w=0.0),
        HassStage(
            "stage2", stage2_epochs, stage2_learning_rate, topk_w=1.0, init_from_previous=True
        ),
    )


def two_stage_commands(
    *,
    verifier: str | os.PathLike[str],
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    stages: tuple[HassStage, ...] | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[list[str]]:
    """The ``speculators train`` command lines (argument lists) of the recipe, one per stage.

    Stage ``i`` writes ``<output>/<stage name>``; a stage with ``init_from_previous`` starts from
    the previous stage's ``final/``. ``extra_args`` are appended to every command (for example
    ``("--seq-len", "2048")``).
    """
    stages = stages if stages is not None else two_stage_schedule()
    commands: list[list[str]] = []
    previous: Path | None = None
    for stage in stages:
        out = Path(output) / stage.name
        command = [
            "speculators",
            "train",
            "--algorithm",
            "eagle",
            "--verifier",
            str(verifier),
            "--data",
            str(data),
            "--output",
            str(out),
            "--num-epochs",
            str(stage.num_epochs),
            "--learning-rate",
            repr(stage.learning_rate),
            "--optimizer-kwargs",
            json.dumps({"betas": list(HASS_BETAS)}),
            "--algo-opt",
            f"topk_w={stage.topk_w!r}",
        ]
        if stage.init_from_previous:
            if previous is None:
                raise SpeculatorsError(
                    f"stage '{stage.name}' starts from a previous stage, but it is the first; "
                    "set init_from_previous=False on the first stage"
                )
            command += ["--algo-opt", f"init_from={previous / 'final'}"]
        commands.append(command + list(extra_args))
        previous = out
    return commands
