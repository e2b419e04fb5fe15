"""``medsynth infer``'s trust options, kept apart from the batch loop in :mod:`.run`.

* :func:`load_model`: a medsynth checkpoint or run folder, an exported ONNX / pt2 / TorchScript file,
  or a MONAI bundle folder;
* :func:`screen_inputs`: the out-of-distribution check before synthesis (warn, or refuse with
  ``--strict``); its result is the sidecar's ``ood`` block;
* :func:`trust_outputs`: ``--uncertainty`` writes ``<out stem>_uncertainty`` (in the output's format) on
  the output's grid and returns the sidecar's ``uncertainty`` block.
"""

from __future__ import annotations

import argparse
import weakref
from pathlib import Path
from typing import Any

from ..io.volume import Volume
from ..model.ood import OODChecker, enforce
from ..model.synthesis import Prediction, SynthesisModel

_checkers: weakref.WeakKeyDictionary[SynthesisModel, OODChecker] = weakref.WeakKeyDictionary()


def load_model(
    path: str | Path, device: str = "cpu", precision: str = "fp32", target: str | None = None
) -> SynthesisModel:
    """A checkpoint (``.pt`` / run folder), an exported model (``.onnx``, ``.pt2``, TorchScript ``.pt``,
    always fp32) or a MONAI bundle folder that ``medsynth export --format monai-bundle`` wrote.

    ``target`` picks the direction of a checkpoint that holds several (a forward and a reverse generator); an export or a
    bundle holds one direction, and its plan judges the target."""
    from ..model.bundle import is_bundle, load_bundle
    from ..model.export import is_exported, load_exported

    if is_exported(path):
        return load_exported(path, device=device)
    if is_bundle(path):
        return load_bundle(path, device=device, precision=precision)
    return SynthesisModel.from_checkpoint(path, device=device, precision=precision, target=target)


def screen_inputs(
    model: SynthesisModel, inputs: dict[str, Volume], args: argparse.Namespace
) -> dict[str, Any]:
    """Check ``inputs`` against the training fingerprint; warn or (``--strict``) refuse; the ``ood`` block."""
    checker = _checkers.get(model)
    if checker is None:
        checker = _checkers[model] = OODChecker(model.fingerprint)
    report = checker.check(inputs)
    enforce(report, strict=bool(getattr(args, "strict", False)))
    return report.to_dict()


def trust_outputs(
    model: SynthesisModel,
    inputs: dict[str, Volume],
    prediction: Prediction,
    out: Path,
    args: argparse.Namespace,
    *,
    batch_size: int,
) -> dict[str, Any]:
    """Sidecar blocks for the options asked for (``--uncertainty``); writes their volumes."""
    if not getattr(args, "uncertainty", False):
        return {}
    from ..model.uncertainty import write_uncertainty

    return {"uncertainty": write_uncertainty(model, inputs, prediction, out, batch_size=batch_size)}
