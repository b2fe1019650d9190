"""``python -m benchmarks.deploy``: every CPU precision and deployment path of OffSeg next to SegFormer, in one table.

One row per path, the model and the baseline (transformers' SegFormer-B0, random weights) side by side:

* ``eager``: PyTorch eager float32 (BatchNorm folded, as ``offseg predict`` runs);
* ``bf16-autocast``, ``bf16-weights`` (``.to(bfloat16)``), ``fp16-autocast`` (when torch runs float16 autocast on
  this device: tried on a tiny convolution first);
* ``int8-pt2e``: int8 PT2E static (:func:`offseg_hf.deploy.quantization.quantize_pt2e`, calibrated on synthetic
  scenes) in eager (reference arithmetic), and ``int8-pt2e-inductor``: the same compiled by inductor;
* ``ort-fp32``: ONNX Runtime float32 of the file :func:`offseg_hf.export_onnx` writes (dynamic sizes), and
  ``ort-int8``: ONNX Runtime's static QDQ quantiser on it (:func:`offseg_hf.deploy.quantization.quantize_onnx`);
* ``compiled-fp32``, ``compiled-bf16``: ``torch.compile`` (inductor) in float32 and under bfloat16 autocast.

Columns, for the model and the baseline: median latency; × own eager fp32 (median of per-round ratios); the
conv+matmul floor in that path (seconds per forward in convolutions and matrix products: PyTorch's profiler for
the PyTorch paths, :func:`benchmarks.models.product_seconds`; ONNX Runtime's node profile for its paths,
:func:`benchmarks.models.ort_product_seconds`) and latency ÷ floor; drift (arg-max agreement with own eager fp32
on synthetic scenes; with ``--trained`` the mIoU difference to fp32 on the synthetic validation set); and the
model ÷ baseline in the same path (median of per-round ratios).

Rounds are interleaved within a group of comparable paths (eager fp32 of both models runs in every group, so each
ratio is taken within a round). On a CPU without bfloat16 (float16) units (AVX512-BF16 / AMX), oneDNN converts
every product to float32 and back: the low-precision paths then run ``--low-precision-runs`` rounds (default 1)
at ``--low-precision-size`` (default 256), which the table states; their floor column shows that the products
themselves are the cost. The header names the CPU, its vector / matrix units and the load average.

``--train`` adds AdamW training steps (batch 2) of both models in float32 and bfloat16 autocast, with the loss
drift between the precisions on the same batch from the same weights.

Quiet by default: the exporter's, quantisers', inductor's and ONNX Runtime's messages and warnings are shown only
with ``--debug`` (which also shows tracebacks); a step that fails prints what it had printed.

The ONNX Runtime sessions do not busy-wait between runs (``spin=False``): spinning threads would take the cores
from the PyTorch path that runs next in the round.
"""

EXAMPLES = """
  python -m benchmarks.deploy
  python -m benchmarks.deploy --paths eager ort-fp32 ort-int8 --runs 10
  python -m benchmarks.deploy --trained outputs/quickstart --no-compile
  python -m benchmarks.deploy --train --paths eager
"""

PATHS = {
    # key: (label, group, precision of the products; None = float32)
    "eager": ("eager fp32", "fp32", None),
    "bf16-autocast": ("bf16 autocast", "low", "bf16"),
    "bf16-weights": ("bf16 weights (.to)", "low", "bf16"),
    "fp16-autocast": ("fp16 autocast", "low", "fp16"),
    "int8-pt2e": ("int8 PT2E (eager reference)", "int8", "int8"),
    "int8-pt2e-inductor": ("int8 PT2E + inductor", "int8", "int8"),
    "ort-fp32": ("ONNX Runtime fp32", "ort", None),
    "ort-int8": ("ONNX Runtime int8 (QDQ)", "ort", "int8"),
    "compiled-fp32": ("compiled fp32 (inductor)", "compiled", None),
    "compiled-bf16": ("compiled bf16 autocast", "compiled-low", "bf16"),
}
COMPILED_PATHS = ("int8-pt2e-inductor", "compiled-fp32", "compiled-bf16")
ORT_PATHS = ("ort-fp32", "ort-int8")


def add_arguments(parser):
    parser.add_argument("--model", default="offseg-t", help="preset or model folder (default: offseg-t)")
    parser.add_argument("--baseline", default="segformer-b0", help="the comparison model (default: segformer-b0)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=None, metavar="PATH",
                        help=f"paths to run, of {', '.join(PATHS)} (default: all but compiled-bf16 on a CPU without bfloat16 units; eager always runs, as the reference)")
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels (default: 512)")
    parser.add_argument("--runs", type=int, default=5, help="timed interleaved rounds (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default: 1)")
    parser.add_argument("--low-precision-size", type=int, default=None,
                        help="input side of the bf16 / fp16 paths (default: --size where the CPU has units for that "
                             "precision, else min(--size, 256))")
    parser.add_argument("--low-precision-runs", type=int, default=None,
                        help="rounds of the bf16 / fp16 paths (default: --runs where the CPU has units for that "
                             "precision, else 1, without warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default: 2)")
    parser.add_argument("--scenes", type=int, default=2,
                        help="synthetic scenes for the arg-max agreement (default: 2; 1 for the slow low-precision rows)")
    parser.add_argument("--floor-runs", type=int, default=2,
                        help="profiled runs per conv+matmul floor (default: 2; 1 for the slow low-precision rows)")
    parser.add_argument("--trained", default=None, metavar="DIR",
                        help="the model trained on the synthetic dataset: mIoU Δ of every path (default: agreement only)")
    parser.add_argument("--trained-baseline", default=None, metavar="DIR",
                        help="the baseline trained on the synthetic dataset, for its mIoU Δ (default: none)")
    parser.add_argument("--eval-samples", type=int, default=100, help="synthetic validation scenes for the mIoU (default: 100)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile paths (minutes on a small CPU) (default: compile)")
    parser.add_argument("--train", action="store_true",
                        help="also time AdamW training steps (batch 2) in fp32 and bf16 autocast, with the loss drift")
    parser.add_argument("--train-size", type=int, default=None,
                        help="input side of the training steps (default: --size where the CPU has bfloat16 units, "
                             "else --low-precision-size)")
    parser.add_argument("--train-runs", type=int, default=1, help="timed training steps per precision (default: 1)")
    parser.add_argument("--work-dir", default=None, help="where the ONNX files go (default: a temporary folder)")


# --------------------------------------------------------------------------------------------------- quiet mode
class _Quiet:
    """Silences the libraries unless ``debug``: Python warnings and logging below ERROR for the whole run, ONNX
    Runtime's default logger at ERROR, and, around each set-up step (:meth:`step`), everything written to
    ``sys.stdout`` / ``sys.stderr`` and to file descriptors 1 and 2 (the exporters' prints, C++ warnings). A step
    that fails re-raises after printing what it had written, so the culprit is visible."""

    def __init__(self, debug: bool, log: str | None = None):
        self.debug, self.hidden_lines, self.log = debug, 0, log

    def __enter__(self):
        import logging
        import warnings

        if self.debug:
            return self
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            import onnxruntime

            onnxruntime.set_default_logger_severity(3)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        import logging

        if not self.debug:
            logging.disable(logging.NOTSET)
            self._warnings.__exit__(*exc)
        return False

    def step(self, what: str):
        import contextlib

        return contextlib.nullcontext() if self.debug else _silenced(what, self)


def _silenced(what: str, quiet: _Quiet):
    import contextlib
    import os
    import sys
    import tempfile

    @contextlib.contextmanager
    def manager():
        sys.stdout.flush()
        sys.stderr.flush()
        if quiet.log is None:
            quiet.log = tempfile.mkstemp(prefix="offseg-deploy-", suffix=".log")[1]
        saved = [os.dup(1), os.dup(2)]
        # Everything goes to the log as it is written: a crash inside the step (no Python exception) leaves its
        # messages there.
        with open(quiet.log, "ab") as sink, open(quiet.log, "a", buffering=1, errors="replace") as text:
            sink.write(f"--- {what}\n".encode())
            sink.flush()
            start = sink.tell()
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                    yield
            except BaseException:
                text.flush()
                _restore(saved)
                printed = _read_from(quiet.log, start)
                if printed.strip():
                    print(f"[{what} failed; what it printed (last 3000 characters, all in {quiet.log}):]\n"
                          f"{printed[-3000:]}", file=sys.stderr)
                raise
            else:
                text.flush()
                _restore(saved)
                quiet.hidden_lines += len(_read_from(quiet.log, start).splitlines())

    return manager()


def _read_from(path, offset: int) -> str:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def _restore(saved):
    import os

    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
    saved.clear()


# --------------------------------------------------------------------------------------------------- the paths
def precision_support(dtype) -> str | None:
    """``None`` when torch runs CPU autocast in ``dtype`` (tried on a tiny convolution and matrix product), else the
    reason it does not."""
    import warnings

    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unsupported dtype warns and disables autocast: reported below
            with torch.autocast("cpu", dtype=dtype):
                out = torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))
                out = out.flatten(1) @ torch.randn(out.flatten(1).shape[1], 2)
        if out.dtype != dtype:
            return f"autocast returned {out.dtype}, not {dtype}"
    except Exception as error:  # noqa: BLE001 - the reason is reported in the table
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


class _Builder:
    """Builds the ``pixel_values → float32 logits`` function of each path for one model (``name``), caching the
    shared steps (PT2E quantisation, ONNX export); ``setup`` collects the seconds of the slow steps."""

    def __init__(self, name, role, model, processor, args, quiet, work_dir):
        self.name, self.role, self.model, self.processor, self.args, self.quiet = name, role, model, processor, args, quiet
        self.work_dir, self.setup, self._cache = work_dir, {}, {}

    def _timed(self, what, function):
        import time

        start = time.perf_counter()
        with self.quiet.step(f"{self.name}: {what}"):
            result = function()
        self.setup[what] = self.setup.get(what, 0.0) + time.perf_counter() - start
        return result

    def _quantized(self, size):
        from offseg_hf.deploy.quantization import calibration_batches, quantize_pt2e

        if ("pt2e", size) not in self._cache:
            calibration = calibration_batches(self.processor, num_batches=4, batch_size=1, size=(size, size))
            self._cache["pt2e", size] = self._timed("int8 PT2E prepare+calibrate+convert",
                                                    lambda: quantize_pt2e(self.model, calibration))
        return self._cache["pt2e", size]

    def _onnx(self, size):
        from offseg_hf.deploy.onnx_export import export_onnx

        if "onnx" not in self._cache:
            path = f"{self.work_dir}/{self.role}.onnx"
            self._timed("ONNX export", lambda: export_onnx(self.model, path, processor=self.processor,
                                                           dynamic_size=True, size=(size, size), verify=False))
            self._cache["onnx"] = path
        return self._cache["onnx"]

    def _onnx_int8(self, size):
        from offseg_hf.deploy.quantization import calibration_batches, quantize_onnx

        if "onnx-int8" not in self._cache:
            source, target = self._onnx(size), f"{self.work_dir}/{self.role}-int8.onnx"
            calibration = calibration_batches(self.processor, num_batches=4, batch_size=1, size=(size, size))
            self._timed("ONNX Runtime int8 quantisation", lambda: quantize_onnx(source, target, calibration))
            self._cache["onnx-int8"] = target
        return self._cache["onnx-int8"]

    def onnx_file(self, key, size):
        return self._onnx(size) if key == "ort-fp32" else self._onnx_int8(size)

    def build(self, key, size):
        """The path's function; a compiled one is compiled here (one call at ``size``)."""
        import torch

        from offseg_hf.deploy.onnx_runtime import OnnxSegmenter
        from offseg_hf.deploy.quantization import to_bfloat16

        model = self.model
        if key == "eager":
            return lambda pixel_values: model(pixel_values=pixel_values).logits
        if key in ("bf16-autocast", "fp16-autocast"):
            dtype = torch.bfloat16 if key.startswith("bf16") else torch.float16

            def autocast(pixel_values):
                with torch.autocast("cpu", dtype=dtype):
                    return model(pixel_values=pixel_values).logits.float()
            return autocast
        if key == "bf16-weights":
            bf16 = to_bfloat16(model)
            return lambda pixel_values: bf16(pixel_values=pixel_values.to(torch.bfloat16)).logits.float()
        if key == "int8-pt2e":
            return self._quantized(size)
        if key in ORT_PATHS:
            segmenter = OnnxSegmenter(self.onnx_file(key, size), threads=self.args.threads, spin=False)
            return lambda pixel_values: torch.from_numpy(segmenter(pixel_values.numpy()))
        example = torch.randn(1, 3, size, size)
        if key == "int8-pt2e-inductor":
            compiled = torch.compile(self._quantized(size))
            function = compiled
        elif key == "compiled-fp32":
            compiled = torch.compile(model)
            function = lambda pixel_values: compiled(pixel_values=pixel_values).logits  # noqa: E731
        elif key == "compiled-bf16":
            compiled = torch.compile(model)

            def function(pixel_values):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return compiled(pixel_values=pixel_values).logits.float()
        else:
            raise ValueError(f"unknown path {key!r}; choose from {', '.join(PATHS)}")

        def first_call():
            with torch.inference_mode():
                function(example)
        self._timed(f"{PATHS[key][0]} compile", first_call)
        return function


# --------------------------------------------------------------------------------------------------- measuring
def _agreement(output, reference) -> float:
    return float((output.float().argmax(1) == reference.argmax(1)).float().mean())


def _measure_group(keys, size, runs, warmup, scenes, floor_runs, slow, builders, args, quiet, say):
    """Interleaved timing, floors and agreement of the paths ``keys`` (eager always included) at ``size``.
    Returns ``{(model, key): result dict}``."""
    import statistics

    import torch

    from benchmarks.models import ort_product_seconds, product_seconds
    from offseg_hf.deploy.quantization import calibration_batches

    keys = ["eager", *[key for key in keys if key != "eager"]]
    inputs = calibration_batches(builders[0].processor, num_batches=scenes, batch_size=1, size=(size, size), seed=1)
    functions, failed = {}, {}
    for builder in builders:
        for key in keys:
            try:
                functions[builder.name, key] = builder.build(key, size)
            except Exception as error:  # noqa: BLE001 - the row says why, the other paths run
                if args.debug:
                    raise
                failed[builder.name, key] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                say(f"  {builder.name} {PATHS[key][0]}: failed ({failed[builder.name, key]})")
    outputs = {}

    def call(pair):
        def run():
            outputs[pair] = functions[pair](inputs[0])
        return run

    say(f"  timing {', '.join(PATHS[k][0] for k in keys)} at {size}²: {runs} round(s) after {warmup} warm-up")
    with torch.inference_mode():
        times = _interleaved({pair: call(pair) for pair in functions}, runs, warmup)
    results = {}
    for (name, key), values in times.items():
        results[name, key] = {"times": values, "eager_times": times[name, "eager"], "size": size, "runs": runs}
        with torch.inference_mode():
            reference = [outputs[name, "eager"]] + [functions[name, "eager"](x) for x in inputs[1:]]
            got = [outputs[name, key]] + [functions[name, key](x) for x in inputs[1:]]
        results[name, key]["agreement"] = statistics.fmean(_agreement(g, r) for g, r in zip(got, reference))
        builder = next(b for b in builders if b.name == name)
        with quiet.step(f"{name}: floor of {key}"):
            if key in ORT_PATHS:
                floor, nodes = ort_product_seconds(builder.onnx_file(key, size), inputs[0].numpy(),
                                                   threads=args.threads, runs=floor_runs)
                results[name, key]["nodes"] = nodes
            else:
                with torch.inference_mode():
                    floor = product_seconds(lambda f=functions[name, key]: f(inputs[0]), runs=floor_runs,
                                            warmup=not slow)
        results[name, key]["floor"] = floor
    for pair, reason in failed.items():
        results[pair] = {"failed": reason, "size": size, "runs": runs}
    return results


def _interleaved(calls, runs, warmup):
    from benchmarks.models import interleaved_times

    return interleaved_times(calls, runs, warmup)


def _training(args, names, size, runs, say):
    """AdamW steps (batch 2) in float32 and bfloat16 autocast from the same weights on the same batch; returns
    ``{(model, precision): {"times", "loss"}}`` (``loss``: of the first step, before any update)."""
    import copy

    import torch

    from benchmarks.models import build_model, interleaved_times, training_step

    results, steps = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(name)
        for precision, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            step = training_step(copy.deepcopy(model), batch_size=2, size=size, num_labels=model.config.num_labels,
                                 autocast_dtype=dtype)
            loss = float(step())  # the first step: same weights, same batch for both precisions
            results[name, precision] = {"loss": loss}
            steps[name, precision] = step
    say(f"  timing training steps at {size}², batch 2: {runs} round(s)")
    times = interleaved_times(steps, runs, warmup=0)
    for pair, values in times.items():
        results[pair]["times"] = values
    return results


def _miou(args, builders_for_trained, processor_size, keys, say):
    """mIoU on the synthetic validation set of each path of the trained model(s), and the arg-max agreement of each
    path with eager fp32 on those same images (the scenes the model was trained for, where the random-scene
    agreement of the table also counts pixels the model has no opinion on): ``({(model, key): mIoU %},
    {(model, key): agreement})``."""
    from offseg_hf.data.synthetic import load_synthetic
    from offseg_hf.evaluation.evaluate import evaluate_model, protocol_for

    miou, agreement = {}, {}
    for builder in builders_for_trained:
        config = builder.model.config
        validation = load_synthetic("validation", num_labels=config.num_labels, num_samples=args.eval_samples,
                                    image_size=processor_size)
        reference = None
        for key in ["eager", *[key for key in keys if key != "eager"]]:
            if key in COMPILED_PATHS:  # compiling per validation size would take minutes each
                continue
            try:
                function = builder.build(key, processor_size)
            except Exception as error:  # noqa: BLE001 - the cell stays empty, the reason is printed
                if args.debug:
                    raise
                say(f"  mIoU of {builder.name} {PATHS[key][0]}: failed to build ({type(error).__name__}: {error})")
                continue
            network = _Network(function)
            result = evaluate_model(network, builder.processor, validation, config.num_labels,
                                    protocol=protocol_for("synthetic", processor_size), progress=False)
            miou[builder.name, key] = 100 * result["mIoU"]
            if key == "eager":
                reference = network.labels
            elif reference is not None:  # the same network inputs, call by call
                same = sum(int((got == want).sum()) for got, want in zip(network.labels, reference))
                agreement[builder.name, key] = same / sum(labels.numel() for labels in reference)
    return miou, agreement


class _Network:
    """A ``pixel_values → logits`` function as the callable network :func:`offseg_hf.segment_image` takes; keeps
    the arg-max of every call (``labels``), to compare paths on the same inputs."""

    def __init__(self, function):
        self.function = function
        self.labels = []

    def __call__(self, pixel_values):
        logits = self.function(pixel_values)
        self.labels.append(logits.float().argmax(1))
        return logits


# --------------------------------------------------------------------------------------------------- the table
def _ms(seconds: float) -> str:
    """Milliseconds to three significant digits (no exponent)."""
    milliseconds = 1000 * seconds
    return f"{milliseconds:.0f}" if milliseconds >= 100 else f"{milliseconds:.{2 - (milliseconds >= 10)}f}"


def format_table(results, keys, model, baseline, miou=None, trained_agreement=None) -> str:
    """Markdown table of :func:`_measure_group` results (see the module's docstring for the columns)."""
    import statistics

    from benchmarks.models import median_ratio

    def cells(name, key):
        result = results.get((name, key))
        if result is None:
            return ["–"] * 5
        if "failed" in result:
            return [f"failed: {result['failed'][:60]}", "–", "–", "–", "–"]
        values, eager = result["times"], result["eager_times"]
        latency = statistics.median(values)
        drift = f"{100 * result['agreement']:.2f} %"
        if miou and (name, key) in miou and (name, "eager") in miou:
            drift += f", mIoU {miou[name, key] - miou[name, 'eager']:+.1f}"
        if trained_agreement and (name, key) in trained_agreement:
            drift += f", trained {100 * trained_agreement[name, key]:.2f} %"
        return [_ms(latency), f"{median_ratio(values, eager):.2f}", _ms(result["floor"]),
                f"{latency / result['floor']:.2f}" if result["floor"] > 0 else "–", drift]

    header = ["path", "size, rounds"]
    for name in (model, baseline):
        header += [f"{name} ms", "× own fp32", "floor ms", "÷ floor",
                   "drift (agreement" + (", mIoU Δ, trained agreement)" if miou else ")")]
    header.append(f"{model} ÷ {baseline}")
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for key in keys:
        any_result = results.get((model, key)) or results.get((baseline, key))
        if any_result is None:
            continue
        row = [PATHS[key][0], f"{any_result['size']}², {any_result['runs']}"]
        row += cells(model, key) + cells(baseline, key)
        a, b = results.get((model, key), {}), results.get((baseline, key), {})
        row.append(f"{median_ratio(a['times'], b['times']):.2f}" if "times" in a and "times" in b else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run(args) -> int:
    import os
    import sys
    import tempfile

    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="offseg-deploy-")
    os.makedirs(args.work_dir, exist_ok=True)
    log = os.path.join(args.work_dir, "library-messages.log")
    if not args.debug:
        print(f"(library messages go to {log}; --debug shows them here)", file=sys.stderr, flush=True)
    with _Quiet(args.debug, log) as quiet:
        with quiet.step("imports"):
            import torch  # noqa: F401 - imported here so that its import-time warnings are silenced too

            import benchmarks.models  # noqa: F401
            import offseg_hf.deploy.quantization  # noqa: F401
        return _run(args, quiet)


def _run(args, quiet) -> int:
    import statistics
    import sys
    import tempfile
    import time

    import torch

    from benchmarks.models import build_model, cpu_facts, median_ratio, prepare_for_inference
    from offseg_hf.inference.image_processing_offseg import build_image_processor

    def say(message):
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights make subnormals (see benchmarks.models.run_benchmark)
    cpu = cpu_facts()
    keys = list(PATHS) if args.paths is None else ["eager", *[k for k in PATHS if k in args.paths and k != "eager"]]
    if not args.compile:
        keys = [key for key in keys if key not in COMPILED_PATHS]
    notes = []
    units = {"bf16": cpu.bf16_units, "fp16": cpu.fp16_units}
    unsupported = {}
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        reason = precision_support(dtype)
        if reason is not None:
            unsupported[precision] = reason
            notes.append(f"{precision} autocast does not run on this CPU with torch {torch.__version__} ({reason}): "
                         f"its rows are left out")
    keys = [key for key in keys if PATHS[key][2] not in unsupported]
    if args.paths is None and not cpu.bf16_units and "compiled-bf16" in keys:
        # inductor's bfloat16 kernels on a CPU without bfloat16 units took the whole process down without a message
        # (2-core AMD EPYC, AVX2, torch 2.14.1): asked for by name only (--paths compiled-bf16)
        keys.remove("compiled-bf16")
        notes.append("compiled bf16 is left out by default on a CPU without bfloat16 units (inductor crashed the "
                     "process on an AVX2-only CPU); --paths compiled-bf16 runs it")
    low_size = args.low_precision_size or min(args.size, 256)
    low_runs = args.low_precision_runs or 1
    for precision in ("bf16", "fp16"):
        if not units[precision] and any(PATHS[k][2] == precision for k in keys):
            flags = "avx512_bf16 / amx_bf16" if precision == "bf16" else "avx512_fp16 / amx_fp16"
            notes.append(f"no {flags} on this CPU: {precision} products are converted to float32 and back (oneDNN "
                         f"reference paths), so the {precision} rows run {low_runs} round(s) at {low_size}² "
                         f"(--low-precision-runs / --low-precision-size); their floor column is that cost")
    if any(PATHS[k][2] == "int8" for k in keys) and not cpu.int8_dot_units:
        notes.append("no VNNI / AMX-INT8 on this CPU: int8 products widen to int16 (AVX2 vpmaddubsw), a smaller gain")

    processor = build_image_processor()
    work_dir = args.work_dir
    torch.manual_seed(0)
    names = [args.model, args.baseline]
    if len(set(names)) != 2:
        raise ValueError(f"--model and --baseline must differ (both {args.model!r})")
    builders = []
    for name, role in zip(names, ("model", "baseline")):
        torch.manual_seed(0)
        with quiet.step(f"{name}: building"):
            model = prepare_for_inference(build_model(name))
        builders.append(_Builder(name, role, model, processor, args, quiet, work_dir))

    groups = {}
    for key in keys:
        _, group, precision = PATHS[key]
        slow = precision in units and not units[precision]
        group_key = (group, slow)
        groups.setdefault(group_key, []).append(key)
    results = {}
    for (group, slow), group_keys in groups.items():
        say(f"{group} paths:")
        run_size = low_size if slow else args.size
        measured = _measure_group(
            group_keys, run_size, low_runs if slow else args.runs, 0 if slow else args.warmup,
            1 if slow else args.scenes, 1 if slow else args.floor_runs, slow, builders, args, quiet, say)
        for (name, key), result in measured.items():
            if key != "eager" or (name, key) not in results:  # eager: the rounds of the fp32 group
                results[name, key] = result

    miou, trained_agreement = {}, {}
    if args.trained or args.trained_baseline:
        from offseg_hf.inference.predict import load_model

        trained_builders = []
        for name, role, folder in zip(names, ("model", "baseline"), (args.trained, args.trained_baseline)):
            if folder:
                with quiet.step(f"{name}: loading {folder}"):
                    trained, trained_processor = load_model(folder, device="cpu")
                trained_builders.append(_Builder(name, role, trained, trained_processor, args, quiet,
                                                 tempfile.mkdtemp(prefix="offseg-deploy-trained-", dir=work_dir)))
        say("mIoU on the synthetic validation set (64² scenes):")
        miou, trained_agreement = _miou(args, trained_builders, 64, keys, say)

    training = {}
    if args.train:
        train_size = args.train_size or (args.size if cpu.bf16_units else low_size)
        say("training steps:")
        training = _training(args, names, train_size, args.train_runs, say)

    cpu = cpu_facts()  # the load at the end
    print(f"\n{args.model} vs {args.baseline} (random weights, 150 classes), batch 1, {args.threads} threads; "
          f"torch {torch.__version__}; wall time {time.perf_counter() - started:.0f} s")
    print(f"CPU: {cpu.line()}")
    for note in notes:
        print(f"note: {note}")
    print("columns: latency = median ms; × own fp32 = median per-round ratio to own eager fp32 at the row's size; "
          "floor = ms per forward in convolutions and matrix products (PyTorch profiler, or ONNX Runtime node "
          "profile for its rows); drift = arg-max agreement with own eager fp32 on synthetic scenes"
          + ("; mIoU Δ on the synthetic validation set (64²) with the trained model, and its arg-max agreement with "
             "eager fp32 on that set" if miou else ""))
    print(format_table(results, keys, args.model, args.baseline, miou, trained_agreement))
    _print_targets(results, args.model, args.baseline, median_ratio)
    if training:
        print(f"\ntraining: one AdamW step, batch 2, {train_size}², {args.train_runs} timed step(s) after one untimed; "
              "loss drift = |loss − fp32 loss| / fp32 loss of the first step (same weights, same batch); "
              "int8 training: not offered (this package has no int8 training path)")
        print(f"| precision | {args.model} s/step | × own fp32 | loss drift | {args.baseline} s/step | × own fp32 | "
              f"loss drift | {args.model} ÷ {args.baseline} |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for precision in ("fp32", "bf16 autocast"):
            row = [precision]
            for name in names:
                result, base = training[name, precision], training[name, "fp32"]
                row += [f"{statistics.median(result['times']):.2f}", f"{median_ratio(result['times'], base['times']):.2f}",
                        f"{abs(result['loss'] - base['loss']) / abs(base['loss']):.1e}"]
            row.append(f"{median_ratio(training[names[0], precision]['times'], training[names[1], precision]['times']):.2f}")
            print("| " + " | ".join(row) + " |")
    setup = [f"{b.name} {what} {seconds:.0f}" for b in builders for what, seconds in b.setup.items()]
    if setup:
        print("\nsetup (s): " + ", ".join(setup))
    if not args.debug:
        print(f"quiet: {quiet.hidden_lines} lines the libraries printed (exporter, quantisers, inductor, ONNX Runtime) "
              f"are hidden (in {quiet.log}); --debug shows them")
    return 0


def _print_targets(results, model, baseline, median_ratio):
    """Issue 28's targets for ONNX Runtime fp32 and compiled fp32, with both figures each."""
    import statistics

    for key, against, floor_target in (("ort-fp32", 1.15, 1.5), ("compiled-fp32", 1.0, 1.3)):
        a, b = results.get((model, key), {}), results.get((baseline, key), {})
        if "times" not in a or "times" not in b:
            continue
        ratio = median_ratio(a["times"], b["times"])
        over_floor = statistics.median(a["times"]) / a["floor"] if a["floor"] > 0 else float("inf")
        print(f"{PATHS[key][0]}: {model} ÷ {baseline} {ratio:.2f} (target ≤ {against}); {model} ÷ its own conv+matmul "
              f"floor {over_floor:.2f} (target ≤ {floor_target}; floor {_ms(a['floor'])} ms"
              + (f" of {_ms(a['nodes'])} ms in all nodes" if "nodes" in a else "") + f"; {baseline}'s floor "
              f"{_ms(b['floor'])} ms" + (f" of {_ms(b['nodes'])} ms" if "nodes" in b else "") + ")")


if __name__ == "__main__":
    import sys

    from offseg_hf.cli import run_tool

    sys.exit(run_tool(sys.modules[__name__]))
