"""Checked exercises: ``exercises.check_x(fn)`` runs your ``fn`` against moelab on random inputs.

Each notebook's closing exercises have a twin in ``notebooks/exercises/`` with a stub to fill in, and the
filled-in answers in ``notebooks/solutions/``. A check returns a verdict shown as one line: ``✓`` with what it
compared, or ``✗`` with the first input on which your function and the library differ, what differs there, and a
hint when the mistake is a common one. The machinery is in :mod:`moelab.exercises.core`; the checks of notebook
NN are in the module named after its topic.
"""
from . import (
               balancing,
               capstone,
               collectives,
               dense,
               expert_parallel,
               fp8_training,
               fragmented,
               moe_layer,
               moe_vs_dense,
               orientation,
               overlap,
               quantization,
               serving,
               slow_link,
               trillion,
)
from .core import Verdict, learner_facing

MODULES = (orientation, dense, moe_layer, balancing, moe_vs_dense, expert_parallel, collectives, overlap,
           quantization, fp8_training, slow_link, fragmented, serving, trillion, capstone)    # notebooks 00 … 14
__all__ = ["Verdict"] + [name for module in MODULES for name in module.__all__]
# what the notebooks call: each check, with an unfilled stub's traceback trimmed to the learner's cell
globals().update({name: learner_facing(getattr(module, name)) for module in MODULES for name in module.__all__})
