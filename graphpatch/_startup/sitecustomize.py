"""Put on PYTHONPATH by ``graphpatch run``: install graphpatch's loader hook,
then run the ``sitecustomize`` this one shadows, if there is one.

The hook is loaded by file path so that interpreter start imports neither
graphpatch nor mlx: they are imported when a model is loaded.
"""

import importlib
import importlib.util
import os
import sys

_here = os.path.dirname(os.path.realpath(__file__))
_spec = importlib.util.spec_from_file_location(
    "graphpatch_hook", os.path.join(os.path.dirname(_here), "run_hook.py")
)
assert _spec is not None and _spec.loader is not None  # a file we ship
_hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hook)
_hook.install()

_ours = sys.modules.pop("sitecustomize")
_saved = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
try:
    importlib.import_module("sitecustomize")
except ImportError:
    sys.modules["sitecustomize"] = _ours
finally:
    sys.path[:] = _saved
