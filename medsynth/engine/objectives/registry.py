"""Names of the training objectives and what data they accept: the torch-free part of the registry.

The recipe loader (:mod:`medsynth.config`) checks ``train.objective`` and ``data.pairing`` against these
without importing torch or any network; :func:`medsynth.engine.objectives.objective_class` imports the
class a name stands for.
"""

from __future__ import annotations

#: ``train.objective`` -> (module of this package, class).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "gan": ("pix2pix", "GANObjective"),
    "l1": ("pix2pix", "L1Objective"),
    "cyclegan": ("cyclegan", "CycleGANObjective"),
    "reggan": ("reggan", "RegGANObjective"),
}
#: Objectives that learn from unpaired samples (``data.pairing: unpaired``); the others need pairs.
UNPAIRED: tuple[str, ...] = ("cyclegan",)
