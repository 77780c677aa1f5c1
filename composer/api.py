"""composer from Python: what the commands do, as functions, for notebooks and scripts.

    from composer.api import load_spec, build_model, train, load_run, predict

    spec = load_spec("specs/quickstart.yaml", ["train.epochs=3"])   # validated; SpecError names each problem
    model = build_model(spec)                 # an nn.Module: normalized (B, C, H, W) floats -> logits
    result = train(spec)                      # as `composer train`: {"run_dir": ..., "final": {...}}
    spec, model, checkpoint = load_run(result["run_dir"])            # the trained model, in eval mode
    predict(result["run_dir"], ["digit.png"])                          # as `composer predict`, a dict

`model.layers` lists every stage with its spec origin, shapes and cost; `summarize(spec)` is the
table of `composer summarize` as a dict. A user mistake raises UserError (SpecError for a spec)
with the message the command would print. Everything here is also importable from the module
that defines it; this module is the list of what stays stable.
"""
from __future__ import annotations

from composer.build import build_model
from composer.checkpoint import load_run
from composer.errors import UserError
from composer.evaluate import evaluate, predict
from composer.export import export
from composer.lr_find import lr_find
from composer.soup import soup
from composer.spec import Spec, SpecError, load_spec, load_spec_text
from composer.summarize import summarize
from composer.timm_weights import import_timm
from composer.train import train

__all__ = ["Spec", "SpecError", "UserError", "build_model", "evaluate", "export", "import_timm", "load_run",
           "load_spec", "load_spec_text", "lr_find", "predict", "soup", "summarize", "train"]
