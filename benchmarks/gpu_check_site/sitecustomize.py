"""The grad-scaler probe of benchmarks/gpu_check.py, loaded by Python at start-up when this folder is on
PYTHONPATH (the check puts it there for one resumed trainer run; nothing else uses this folder).

In a torchrun worker (LOCAL_RANK set) with $ISTA2_SCALER_PROBE naming a file, it writes that file at once
as {"installed": true, "scaler": null}, then, the first time an *enabled* grad scaler scales a loss, as
{"installed": true, "scaler": <its state_dict()>}: the scale and growth tracker the run's first AMP step
starts from, which after a resume must be what the checkpoint holds. Without the variable it does nothing
(torch is not even imported). Any sitecustomize this one shadows is run afterwards.
"""
import importlib.machinery
import importlib.util
import json
import os
import sys


def write(path, scaler_state):
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump({'installed': True, 'pid': os.getpid(), 'scaler': scaler_state}, f)
    os.replace(tmp, path)


def install(path):
    """Record the state of the first enabled torch.amp.GradScaler (or subclass) when it first scales."""
    import torch

    original = torch.amp.GradScaler.scale
    seen = []

    def scale(self, outputs):
        result = original(self, outputs)
        if self.is_enabled() and not seen:
            seen.append(True)
            write(path, self.state_dict())
        return result

    scale.probe_original = original
    torch.amp.GradScaler.scale = scale
    write(path, None)


def run_shadowed_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec('sitecustomize', others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get('ISTA2_SCALER_PROBE') and 'LOCAL_RANK' in os.environ and __name__ == 'sitecustomize':
    install(os.environ['ISTA2_SCALER_PROBE'])
if __name__ == 'sitecustomize':
    run_shadowed_sitecustomize()
