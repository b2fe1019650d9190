"""``import offseg_hf`` activates the models with the Auto classes and pipelines, without importing torch itself.

Registering a model with ``AutoConfig`` / ``AutoModelFor…`` needs its classes, i.e. torch and transformers (about
10 s of imports on a 2-core CPU), while ``offseg --help`` must answer at once and the package's lazy names import
nothing heavy. So the registration (:func:`offseg_hf.models._register_auto_classes`) runs at the first moment it can
matter, and only then:

* ``transformers`` already imported when ``offseg_hf`` is: at once;
* otherwise, right after ``transformers`` finishes importing (a one-shot post-import hook on ``sys.meta_path``):
  nobody can reach an Auto class or ``pipeline`` before that, so ``import offseg_hf`` followed by
  ``AutoModelForSemanticSegmentation.from_pretrained(folder)`` or ``pipeline(..., model=folder)`` loads the installed
  classes with no ``trust_remote_code``, and a process that never imports transformers (``offseg --help``) pays nothing.

A failure of the registration (say, an incompatible transformers release) is reported as a warning and never
breaks ``import transformers``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_TRIGGER = "transformers"


def activate_models() -> None:
    """Register every model of the package with transformers now, or as soon as transformers is imported."""
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())


def _register() -> None:
    models = sys.modules.get("offseg_hf.models")
    if models is not None and getattr(models.__spec__, "_initializing", False):
        return  # transformers was imported by offseg_hf.models itself, which registers when it finishes
    try:
        importlib.import_module("offseg_hf.models")  # registers on import (once per process)
    except Exception as error:  # noqa: BLE001 - never break the user's `import transformers`
        warnings.warn(
            f"offseg_hf could not register its models with transformers ({type(error).__name__}: {error}); "
            "`from offseg_hf.models import ...` shows the full error", RuntimeWarning, stacklevel=3,
        )


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is about to be imported, it takes the spec the other finders
    give, lets that loader run ``transformers/__init__.py`` as usual and registers the models right after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot, and the look-up below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module):
            run_package(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec
