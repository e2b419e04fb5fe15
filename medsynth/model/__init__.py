"""What a trained synthesis model *is*, in one place.

Training (``engine/``), ``medsynth infer`` (``inference/``), ``medsynth evaluate`` and ``medsynth convert``
all use this package and never each other:

* :mod:`.plan`: the typed inference contract (task, input layout, slicing or patching, precision,
  generator constructor) stored in every checkpoint;
* :mod:`.layout`: the one builder of the network's input channels (fixed tasks and unified models);
* :mod:`.networks`: generator and critic built from a recipe and a task;
* :mod:`.slicing` / :mod:`.sliding`: whole-volume synthesis, slice-wise (2D/2.5D) or by 3D windows;
* :mod:`.synthesis`: :class:`~.synthesis.SynthesisModel`, volumes in, synthetic volume out, the same
  computation for validation, inference, evaluation and conversion;
* :mod:`.checkpoint`: the checkpoint format (save, safe load, run folder -> file).

Submodules are imported where they are used, so importing this package costs nothing.
"""
