"""A new user's first minutes: ``import offseg_hf`` activates every model with transformers (Auto classes and the
image-segmentation pipeline, installed code, no ``trust_remote_code``) while importing no torch itself, and a
model built from a config with fewer than 2 classes refuses to exist, whatever model type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offseg_hf.data.registry import get_dataset_info

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fresh_python(code: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (nothing imported or registered yet), stdin closed: a remote-code prompt would
    print and fail instead of waiting."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )


# ------------------------------------------------------------------------------------------ import offseg_hf


def test_import_offseg_hf_imports_no_torch_and_registers_when_transformers_loads():
    code = """
import sys
import offseg_hf
before = sorted(name for name in ("torch", "transformers", "offseg_hf.models") if name in sys.modules)
from transformers import AutoConfig, AutoImageProcessor
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
legacy = IMAGE_PROCESSOR_MAPPING[type(AutoConfig.for_model("offseg"))]  # folders saved by offseg-hf 0.1 name it
print(before, type(AutoConfig.for_model("offseg")).__name__, type(AutoConfig.for_model("mask2former_offset")).__name__,
      legacy["torchvision"].__name__)
"""
    completed = _fresh_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["[]", "OffSegConfig", "Mask2FormerOffsetConfig", "OffSegImageProcessor"]


def test_import_after_transformers_registers_at_once():
    code = """
import sys
import transformers
import offseg_hf
print("offseg_hf.models" in sys.modules, type(transformers.AutoConfig.for_model("segnext")).__name__)
"""
    completed = _fresh_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["True", "SegNextConfig"]


@pytest.mark.parametrize("first_import", ["from offseg_hf import OffSegConfig", "from offseg_hf import build_image_processor"])
def test_a_first_import_that_loads_transformers_itself_registers_everything_once(first_import):
    """The package's own modules import transformers: the hook must neither re-enter a half-imported
    ``offseg_hf.models`` nor warn; every registration is there afterwards."""
    code = f"""
import warnings
warnings.simplefilter("error", RuntimeWarning)
{first_import}
from transformers import AutoConfig
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
config_class = type(AutoConfig.for_model("offseg"))
print(config_class.__name__, IMAGE_PROCESSOR_MAPPING[config_class]["torchvision"].__name__)
"""
    completed = _fresh_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "could not register" not in completed.stderr
    assert completed.stdout.split() == ["OffSegConfig", "OffSegImageProcessor"]


def test_a_failing_registration_warns_and_leaves_transformers_importable():
    """An incompatible model package must not break ``import transformers`` for the user."""
    code = """
import sys, warnings
sys.modules["offseg_hf.models"] = None  # its import now raises ImportError
import offseg_hf
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import transformers
print(transformers.__name__, any("could not register its models" in str(w.message) for w in caught))
"""
    completed = _fresh_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["transformers", "True"]


# ---------------------------------------------------- converted folders: Auto class + pipeline, fresh process


def _mmseg_checkpoint(state_dict: dict, path: Path) -> Path:
    torch.save({"state_dict": state_dict, "meta": {"dataset_meta": {"classes": get_dataset_info("ade20k").class_names}}}, path)
    return path


@pytest.fixture(scope="module")
def converted_folders(fixtures_dir, tmp_path_factory) -> dict[str, Path]:
    """The golden OffSeg-T, SegFormer-B0 + offset learning and SegNeXt-T weights, converted as ``offseg convert`` does."""
    from offseg_hf.conversion.convert import convert_any_checkpoint

    root = tmp_path_factory.mktemp("first-contact")
    folders = {}
    for name in ("offseg-t", "segformer-b0-offset", "segnext-t"):
        checkpoint = _mmseg_checkpoint(load_file(fixtures_dir / f"{name}_official.safetensors"), root / f"{name}_ade20k.pth")
        folders[name] = convert_any_checkpoint(checkpoint, root / f"{name}-ade20k").output_dir
    return folders


FRESH_PROCESS = r"""
import json, sys
import numpy as np
from PIL import Image
import offseg_hf
from transformers import AutoModelForSemanticSegmentation, pipeline

image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
report = {}
for folder in sys.argv[1:]:
    model = AutoModelForSemanticSegmentation.from_pretrained(folder)
    segmenter = pipeline("image-segmentation", model=folder)
    segments = segmenter(image)
    report[folder] = [type(model).__module__, type(model).__name__, type(segmenter.model).__module__,
                      len(segments), all(s["mask"].size == image.size for s in segments)]
print("REPORT", json.dumps(report))
"""


def test_converted_folders_load_and_segment_after_a_bare_import(converted_folders):
    """Auto class and pipeline, no ``trust_remote_code``: the installed package's classes (not the folder's copy of
    the code), and the pipeline logs no "not supported" error for them."""
    folders = [str(folder) for folder in converted_folders.values()]
    completed = _fresh_python(FRESH_PROCESS, *folders)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "trust_remote_code" not in output and "custom code" not in output, output[-3000:]
    assert "is not supported for" not in output, output[-3000:]
    report = json.loads(output.split("REPORT ", 1)[1].splitlines()[0])
    expected = {
        "offseg-t": ("offseg_hf.models.modeling_offseg", "OffSegForSemanticSegmentation"),
        "segformer-b0-offset": ("offseg_hf.models.modeling_segformer_offset", "SegformerOffsetForSemanticSegmentation"),
        "segnext-t": ("offseg_hf.models.modeling_segnext", "SegNextForSemanticSegmentation"),
    }
    for name, folder in converted_folders.items():
        module, class_name, pipeline_module, count, sizes_ok = report[str(folder)]
        assert (module, class_name) == expected[name] and pipeline_module == module, (name, report[str(folder)])
        assert count >= 1 and sizes_ok, (name, report[str(folder)])


def test_pipeline_names_our_models_in_the_tables_it_checks():
    """In process, with the log captured: creating the pipeline reports nothing for a model of this package."""
    import logging

    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from offseg_hf import OffSegForSemanticSegmentation
    from test_modeling_common import tiny_offseg_config

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.ERROR)
    logger = hf_logging.get_logger("transformers.pipelines.base")
    logger.addHandler(handler)
    try:
        from offseg_hf.inference.image_processing_offseg import build_image_processor

        model = OffSegForSemanticSegmentation(tiny_offseg_config()).eval()
        segmenter = pipeline("image-segmentation", model=model, image_processor=build_image_processor("ade20k"))
    finally:
        logger.removeHandler(handler)
    assert type(segmenter.model) is OffSegForSemanticSegmentation
    assert not [message for message in records if "not supported" in message], records


# ------------------------------------------------------------------------------------------ num_labels < 2


def _configs():
    from offseg_hf import Mask2FormerOffsetConfig, SegNextConfig
    from test_modeling_common import tiny_offseg_config, tiny_segformer_offset_config

    return {
        "OffSeg": (tiny_offseg_config, "OffSegForSemanticSegmentation"),
        "SegFormer + offset learning": (tiny_segformer_offset_config, "SegformerOffsetForSemanticSegmentation"),
        "SegNeXt": (lambda **kw: SegNextConfig.from_preset("segnext-t-offset", **kw), "SegNextForSemanticSegmentation"),
        "Mask2Former + offset learning": (lambda **kw: Mask2FormerOffsetConfig(**kw), "Mask2FormerOffsetForUniversalSegmentation"),
    }


@pytest.mark.parametrize("model_name", list(_configs()))
def test_one_class_is_refused_by_config_and_by_model(model_name):
    """``config.num_labels = 1`` after the config was built (as transformers' own SegFormer tests and users do)
    reaches the model: it refuses with the message the config gives at construction."""
    import offseg_hf

    from huggingface_hub.errors import StrictDataclassClassValidationError

    build, class_name = _configs()[model_name]
    with pytest.raises((ValueError, StrictDataclassClassValidationError)) as at_config:
        build(num_labels=1)
    config = build(num_labels=3)
    config.num_labels = 1
    with pytest.raises(ValueError) as at_model:
        getattr(offseg_hf, class_name)(config)
    message = str(at_model.value)
    assert message.startswith(f"{model_name} needs num_labels >= 2, got 1") and "use num_labels=2" in message
    assert message in str(at_config.value)


# ------------------------------------------------------------------ README's test command is what CI runs


def test_readme_test_commands_are_what_ci_runs_and_install_every_extra():
    """README's "Run the tests" block, line for line, is in ``.ci/run``; its ``test`` extra pulls every other extra,
    so the command as written runs the demo, export and quantisation tests too."""
    import configparser
    import re

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"Run the tests[^\n]*\n(?:[^\n]*\n)*?```bash\n(.*?)```", readme, flags=re.DOTALL)
    assert block, "README has no 'Run the tests' bash block"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ['pip install -e ".[test]"', "python -m pytest -q -rs"], commands
    ci_lines = {line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    assert set(commands) <= ci_lines, set(commands) - ci_lines

    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    extras = {name: value.split() for name, value in setup["options.extras_require"].items()}
    (requirement,) = extras["test"]
    name, _, listed = requirement.rstrip("]").partition("[")
    assert name == setup["metadata"]["name"] and sorted(listed.split(",")) == sorted(set(extras) - {"test"}), requirement
