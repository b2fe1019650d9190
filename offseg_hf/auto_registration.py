"""``import offseg_hf`` activates the models with the Auto classes and pipelines, without importing torch itself.

Registering a model with ``AutoConfig`` / ``AutoModelFor…`` needs its classes, i.e. torch and transformers (about
10 s of imports on a 2-core CPU), while ``offseg --help`` must answer at once and the package's lazy names import
nothing heavy. So the registration (:func:`offseg_hf.models._register_auto_classes`) runs at the first moment it can
matter, and only then:

* ``transformers`` already imported when ``offseg_hf`` is: at once;
* otherwise, right after ``transformers`` finishes importing (a one-shot post-import hook on ``sys.meta_path``), or,
  when a module of this package is what imported transformers, at the first import once that module is complete:
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


# The modules that register with transformers when imported, once per process: the models (AutoConfig,
# AutoBackbone, AutoModel…, AutoImageProcessor for OffSeg, the pipeline's name tables) and the image processors
# that need the inference helpers (Mask2Former's reference semantic prediction).
_REGISTERING_MODULES = ("offseg_hf.models", "offseg_hf.inference.image_processing_offseg")


def _package_mid_import() -> bool:
    """Whether a module of this package is being imported right now (its own import is what loaded transformers).
    The package's ``__init__`` does not count: it imports only this module, and calls :func:`activate_models` last."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)  # importlib's mark of a running import
        for name, module in list(sys.modules.items())
        if name.startswith("offseg_hf.")
    )


def _register() -> None:
    if _package_mid_import():
        # Importing our modules now would re-enter a half-imported one: register at the first import that
        # happens once they are all complete (offseg_hf.models registers itself as it finishes anyway).
        sys.meta_path.insert(0, _OnceThePackageIsImported())
        return
    try:
        for name in _REGISTERING_MODULES:
            importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - never break the user's `import transformers`
        warnings.warn(
            f"offseg_hf could not register its models with transformers ({type(error).__name__}: {error}); "
            f"`import {name}` shows the full error", RuntimeWarning, stacklevel=3,
        )


class _OnceThePackageIsImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: at the first import request made while no module of the package is mid-import, it
    removes itself and registers."""

    def find_spec(self, fullname, path=None, target=None):
        if not _package_mid_import():
            sys.meta_path.remove(self)
            _register()
        return None


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
