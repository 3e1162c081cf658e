"""bn-inspect: see what every BatchNorm layer of a PyTorch model computes on your data.

The public Python API; torch is imported only when a function that needs it is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bn_inspect.errors import BnInspectError
from bn_inspect.options import Mode
from bn_inspect.output import plain as _plain
from bn_inspect.output.html import notebook as _notebook
from bn_inspect.report.records import SCHEMA_VERSION, InputInfo, LayerReport, ModelInfo, Report
from bn_inspect.version import __version__

if TYPE_CHECKING:
    from bn_inspect.analyses.checking import check_model
    from bn_inspect.analyses.inspection import inspect_model
    from bn_inspect.analyses.modes import compare_modes
    from bn_inspect.analyses.recalibration import recalibrate
    from bn_inspect.analyses.watch import Watch, watch
    from bn_inspect.data.batch import Batch
    from bn_inspect.distributed.context import DistributedContext
    from bn_inspect.model.loading import load_model
    from bn_inspect.model.saving import save_like


# Results draw themselves in Jupyter (_repr_html_) and at a prompt (a compact repr, .table());
# report/ holds the hooks, output/ the page and the text.
_notebook.register()
_plain.register()

__all__ = [
    "SCHEMA_VERSION",
    "Batch",
    "BnInspectError",
    "DistributedContext",
    "InputInfo",
    "LayerReport",
    "Mode",
    "ModelInfo",
    "Report",
    "Watch",
    "__version__",
    "check_model",
    "compare_modes",
    "inspect_model",
    "load_model",
    "recalibrate",
    "save_like",
    "watch",
]

_LAZY = {
    "check_model": "bn_inspect.analyses.checking",
    "compare_modes": "bn_inspect.analyses.modes",
    "recalibrate": "bn_inspect.analyses.recalibration",
    "save_like": "bn_inspect.model.saving",
    "inspect_model": "bn_inspect.analyses.inspection",
    "Batch": "bn_inspect.data.batch",
    "load_model": "bn_inspect.model.loading",
    "DistributedContext": "bn_inspect.distributed.context",
    "watch": "bn_inspect.analyses.watch",
    "Watch": "bn_inspect.analyses.watch",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'bn_inspect' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
