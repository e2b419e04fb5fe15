import json
from pathlib import Path
import numpy as np, nibabel as nib
from test_ood import _held_out, _image, _finer, _write
from medsynth.io.readers import read_volume
from medsynth.model.ood import check_inputs
from medsynth.model.synthesis import SynthesisModel

def test_explore(tiny_run, tiny_cohort, tmp_path):
    model = SynthesisModel.from_checkpoint(tiny_run)
    subject = _held_out(tiny_run)[0]
    t1 = read_volume(_image(tiny_cohort, subject, "T1w"))
    cases = {
        "finer": _finer(t1, tmp_path / "fine.nii.gz"),
        "noise": _write(tmp_path / "noise.nii.gz", np.random.default_rng(0).uniform(0, 1000, t1.shape), t1.affine),
        "neg": _write(tmp_path / "neg.nii.gz", t1.array.max() - t1.array, t1.affine),
        "t2": _image(tiny_cohort, subject, "T2w"),
        "pd": _image(tiny_cohort, subject, "PDw"),
        "flair": _image(tiny_cohort, subject, "FLAIR"),
    }
    for name, path in cases.items():
        r = check_inputs(model.fingerprint, {"t1": read_volume(path)})
        print(name, r.reasons, json.dumps(r.checks["histogram"]))
