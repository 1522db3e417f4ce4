"""The typer app: parse options, call the library, render. Errors become one stderr line + exit 2.

TensorFlow is imported only inside the commands that train, so `--help`, `samples` and
`report` start fast. Set GRADWATCH_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import math
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import BrokenPipe, GradwatchError, Interrupted, OptionError, blank, counted, one_line
from .signals import signal_name

app = typer.Typer(
    name="gradwatch",
    help="Watch gradients while training a TensorFlow model, and see which clipping stops the loss from jumping.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _Panelled(typer.core.TyperCommand):
    """A command whose --help groups its options under headings (each option's rich_help_panel),
    in plain text: the many options of run and compare read by what they are for."""

    def format_options(self, ctx, formatter) -> None:
        args, groups = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append(record)
            else:
                groups.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        order = ["Model and data", "Training", "Clipping", "Diagnosis", "Outputs", "Scale"]
        for name, records in sorted(groups.items(), key=lambda g: order.index(g[0]) if g[0] in order else len(order)):
            with formatter.section(name):
                formatter.write_dl(records)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


class OnNonFinite(str, Enum):
    skip = "skip"
    apply = "apply"
    stop = "stop"


class SparseNorm(str, Enum):
    summed = "summed"
    rows = "rows"


# --- options shared by run and compare (one definition each) -------------------------------------
ModelArg = Annotated[Optional[str], typer.Argument(help="SavedModel folder or .keras file. Omit it to train a built-in sample.", show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Data: .npz, .csv, .txt corpus, or a tf.data.Dataset.save folder.", show_default=False, rich_help_panel='Model and data')]
SampleOpt = Annotated[Optional[str], typer.Option("--sample", help="Built-in sample to train (see `gradwatch samples`); the default is ptb-small.", show_default=False, rich_help_panel='Model and data')]
EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint", help="SavedModel function or signature to call (default: __call__, serve, serving_default).", show_default=False, rich_help_panel='Model and data')]
OutputOpt = Annotated[Optional[str], typer.Option("--output", help="Output name, for endpoints that return a dict of several.", show_default=False, rich_help_panel='Model and data')]
XKeyOpt = Annotated[Optional[str], typer.Option("--x-key", help="Array of inputs in an .npz file.  [default: x]", show_default=False, rich_help_panel='Model and data')]
YKeyOpt = Annotated[Optional[str], typer.Option("--y-key", help="Array of targets in an .npz file.  [default: y]", show_default=False, rich_help_panel='Model and data')]
TargetOpt = Annotated[Optional[str], typer.Option("--target", help="Target column of a .csv file.  [default: the last column]", show_default=False, rich_help_panel='Model and data')]
ImportOpt = Annotated[Optional[list[str]], typer.Option("--import", help="A Python module (a name on the path, or a .py file) to import before the model loads: where its custom layers are registered with @keras.saving.register_keras_serializable (repeat it).", show_default=False, rich_help_panel='Model and data')]
VocabOpt = Annotated[Optional[str], typer.Option("--vocab", help="Vocabulary for a .txt corpus, one word a line.  [default: the model's assets/vocab.txt]", show_default=False, rich_help_panel='Model and data')]
NumStepsOpt = Annotated[Optional[int], typer.Option("--num-steps", help="Window length for a .txt corpus.  [default: the model's input length]", show_default=False, rich_help_panel='Model and data')]
LossOpt = Annotated[Optional[str], typer.Option("--loss", help="Any Keras loss identifier: mse, huber, binary_crossentropy, sparse_categorical_crossentropy, kl_divergence, ...  [default: the model's compiled loss, or its loss(inputs, targets)]", show_default=False, rich_help_panel='Training')]
FromLogitsOpt = Annotated[Optional[bool], typer.Option("--from-logits", help="The model outputs logits (crossentropy losses).", show_default=False, rich_help_panel='Training')]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Rows per step.  [default: 32, or the sample's]", show_default=False, rich_help_panel='Training')]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Number of training steps.  [default: one epoch, or the sample's]", show_default=False, rich_help_panel='Training')]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs (instead of --steps).", show_default=False, rich_help_panel='Training')]
ShuffleOpt = Annotated[Optional[bool], typer.Option("--shuffle/--no-shuffle", help="Shuffle rows each epoch.  [default: shuffle arrays, keep a text corpus in order]", show_default=False, rich_help_panel='Training')]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of the shuffle order and TF's random ops.  [default: 0]", show_default=False, rich_help_panel='Training')]
OptimizerOpt = Annotated[Optional[str], typer.Option("--optimizer", help="Any Keras optimizer identifier: sgd, momentum (SGD, 0.9), adam, adamw, rmsprop, nadam, lion, ...  [default: the model's compiled optimizer, else sgd]", show_default=False, rich_help_panel='Training')]
OptOpt = Annotated[Optional[list[str]], typer.Option("--opt", help="An optimizer hyperparameter NAME=VALUE, e.g. --opt beta_1=0.8 --opt weight_decay=1e-4 (repeat it).", show_default=False, rich_help_panel='Training')]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate.  [default: the optimizer's own (compiled), else 0.01, or the sample's]", show_default=False, rich_help_panel='Training')]
LrDecayOpt = Annotated[Optional[float], typer.Option("--lr-decay", help="Multiply the learning rate by this every epoch after --decay-after-epoch.", show_default=False, rich_help_panel='Training')]
DecayAfterOpt = Annotated[Optional[int], typer.Option("--decay-after-epoch", help="Epochs at the full learning rate before --lr-decay applies.  [default: 1]", show_default=False, rich_help_panel='Training')]
OnNonFiniteOpt = Annotated[Optional[OnNonFinite], typer.Option("--on-nonfinite", help="skip: leave the weights, optimizer, clipping and BatchNorm state as they were and go on; apply: apply the update anyway (as Keras fit does); stop: end the run (compare: that variant) after writing its rows, exit 3 in run.  [default: skip]", show_default=False, rich_help_panel='Training')]
SparseNormOpt = Annotated[Optional[SparseNorm], typer.Option("--sparse-norm", help="What clipping measures an embedding gradient's repeated rows by: summed (the true norm of the applied gradient) or rows (row by row, as Keras' global_clipnorm/clipnorm/clipvalue and tf.clip_by_global_norm do, so the threshold is the one to type into Keras).  [default: summed]", show_default=False, rich_help_panel='Clipping')]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Continue from a tf.train.Checkpoint written as tf.train.Checkpoint(model=model, optimizer=optimizer) (by your training loop, or by --save-checkpoints): the model's variables and the optimizer's state; a folder means its latest.", show_default=False, rich_help_panel='Training')]
SaveCheckpointsOpt = Annotated[Optional[Path], typer.Option("--save-checkpoints", help="Write the run's model and optimizer state into this folder (step-N) every --checkpoint-every steps, for --checkpoint later.", show_default=False, rich_help_panel='Training')]
CheckpointEveryOpt = Annotated[Optional[int], typer.Option("--checkpoint-every", help="With --save-checkpoints: at every step that is a multiple of N.  [default: 100]", show_default=False, rich_help_panel='Training')]
StartStepOpt = Annotated[Optional[int], typer.Option("--start-step", help="Continue as step N+1 of your training: the first N batches of the data order are skipped, rows are numbered from N+1, and a .keras file's saved optimizer state (slots, iteration count, schedule) goes on.  [default: 0]", show_default=False, rich_help_panel='Training')]
FreshOptimizerOpt = Annotated[Optional[bool], typer.Option("--fresh-optimizer", help="Start the optimizer over instead of continuing from the state a .keras file saved.", show_default=False, rich_help_panel='Training')]
FetchEveryOpt = Annotated[Optional[int], typer.Option("--fetch-every", help="Fetch recorded values from the device every N steps (one row per step either way).  [default: auto, about every 0.25 s]", show_default=False, rich_help_panel='Scale')]
XlaOpt = Annotated[Optional[bool], typer.Option("--xla/--no-xla", help="Compile the training step with XLA (it stops with a one-line reason where XLA cannot compile the model).  [default: as Keras' jit_compile=\"auto\": on where a GPU is visible, falling back with a note where XLA cannot compile]", show_default=False, rich_help_panel='Scale')]
SpikeFactorOpt = Annotated[Optional[float], typer.Option("--spike-factor", help="A spike is a loss above FACTOR x the median of the previous --spike-window losses.  [default: 2]", show_default=False, rich_help_panel='Diagnosis')]
SpikeFloorOpt = Annotated[Optional[float], typer.Option("--spike-floor", help="The spike rule's absolute floor: a spike also rises by more than this fraction of the largest loss so far (so float32 noise near 0 is none).  [default: 0.01]", show_default=False, rich_help_panel='Diagnosis')]
FindingsOpt = Annotated[Optional[Path], typer.Option("--findings", help="Write the verdict's findings (code, variant, steps, numbers, message) to this JSON file.", show_default=False, rich_help_panel='Diagnosis')]
FailOnOpt = Annotated[Optional[str], typer.Option("--fail-on", help="Exit 4, after writing every output, when a finding with one of these codes appears, e.g. loss_spikes,nonfinite (codes: README, Findings).", show_default=False, rich_help_panel='Diagnosis')]
SpikeWindowOpt = Annotated[Optional[int], typer.Option("--spike-window", help="Steps in the spike rule's rolling median.  [default: 20]", show_default=False, rich_help_panel='Diagnosis')]
AllowNonFiniteOpt = Annotated[Optional[bool], typer.Option("--allow-nonfinite-data", help="Train even when the data holds NaN or inf (the verdict then blames the data, not the training).", show_default=False, rich_help_panel='Model and data')]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Also draw loss, grad norm and fraction clipped per step into this .png, .svg or .pdf.", show_default=False, rich_help_panel='Outputs')]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Write every step's row to this CSV, as the run goes.", show_default=False, rich_help_panel='Outputs')]
FormatOpt = Annotated[Format, typer.Option("--format", help="table: summary and verdict; csv: the rows; json: {rows, findings}; on stdout.", rich_help_panel='Outputs')]
LayersCsvOpt = Annotated[Optional[Path], typer.Option("--layers-csv", help="Write each variable's norms at every step (grad, clipped, weight, update) to this CSV, long form.", show_default=False, rich_help_panel='Outputs')]
PerVariableOpt = Annotated[Optional[bool], typer.Option("--per-variable/--no-per-variable", help="Record each variable's norms (spike attribution, per-layer table).  [default: on for the table, --layers-csv and --tensorboard]", show_default=False, rich_help_panel='Outputs')]
TensorBoardOpt = Annotated[Optional[Path], typer.Option("--tensorboard", help="Write TensorBoard event files to this folder: scalars every step, per-variable norms, gradient histograms (one sub-folder per run).", show_default=False, rich_help_panel='Outputs')]
StreamOpt = Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Read the data as a stream instead of into memory (.npz saved with numpy.savez, tf.data.Dataset.save folders; TFRecord always).  [default: when larger than 256 MiB]", show_default=False, rich_help_panel='Model and data')]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="The features of a TFRecord file of tf.train.Example: NAME:DTYPE[:SHAPE],... e.g. x:float32:20,y:int64; the target is --target, else the last.", show_default=False, rich_help_panel='Model and data')]
ShuffleBufferOpt = Annotated[Optional[int], typer.Option("--shuffle-buffer", help="Streamed tf.data folders and TFRecord files: shuffle within a buffer of N elements, seeded by --seed and reshuffled every epoch.  [default: 10000]", show_default=False, rich_help_panel='Model and data')]
StrategyOpt = Annotated[Optional[str], typer.Option("--strategy", help="tf.distribute: none, mirrored (the local GPUs, or --cpu-devices N) or multiworker (the cluster in TF_CONFIG; the chief writes the outputs). Gradients are all-reduced before any norm or clipping.  [default: none]", show_default=False, rich_help_panel='Scale')]
CpuDevicesOpt = Annotated[Optional[int], typer.Option("--cpu-devices", help="Split the CPU into N logical devices, e.g. to try --strategy mirrored without GPUs.", show_default=False, rich_help_panel='Scale')]
HistogramEveryOpt = Annotated[int, typer.Option("--histogram-every", help="With --tensorboard: a histogram of every variable's gradient every N steps and at the last (0: none).", rich_help_panel='Outputs')]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or start line on stderr.", rich_help_panel='Outputs')]


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class _Stdout(Console):
    """rich's Console, but a closed pipe ends the command as any Unix tool's (exit 141, quietly),
    not with rich's SystemExit(1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipe()


def _stdout() -> Console:
    # Piped or redirected output is read later in an editor or a log: tables take the width their
    # content needs and sentences stay on one line (no hard wrap).
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return _Stdout(highlight=False, width=100_000, soft_wrap=True)
    return _Stdout(highlight=False)


def _version(value: bool):
    if value:
        print(f"gradwatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = False,
):
    """Watch gradients while training a TensorFlow model, and see which clipping stops the loss from jumping."""


class Progress:
    """A rich progress bar on stderr, shown only on a terminal and only once a run has taken
    more than a couple of seconds."""

    def __init__(self, quiet: bool, label: str):
        self.enabled = not quiet and sys.stderr.isatty()
        self.started_at = time.perf_counter()
        self.label = label
        self.bar = None
        self.task = None

    def update(self, done: int, total: int, label: str | None = None):
        if not self.enabled:
            return
        if self.bar is None:
            if time.perf_counter() - self.started_at < 2.0:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=_stderr(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(escape(label or self.label), total=total)
        self.bar.update(self.task, completed=done, total=total, description=escape(label or self.label))

    def close(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _spec(**options):
    from .session import RunSpec

    options["on_nonfinite"] = options["on_nonfinite"].value if options.get("on_nonfinite") else None
    options["sparse_norm"] = options["sparse_norm"].value if options.get("sparse_norm") else None
    options["opt"] = tuple(options["opt"]) if options.get("opt") else None
    options["imports"] = tuple(options["imports"]) if options.get("imports") else None
    return RunSpec(**options)


def _say(quiet: bool, message: str):
    if not quiet:
        _stderr().print(escape(message))


def _warn_skipped(trainer):
    for warning in trainer.model.warnings:
        _stderr().print(escape(f"gradwatch: warning: {warning}"))
    if trainer.skipped:
        _stderr().print(escape(f"gradwatch: warning: no gradient reaches {', '.join(trainer.skipped)}; left out of training and norms"))


def _emit_rows(rows, columns, fmt: Format, found=()):
    """--format csv: the rows; json: {"rows": [...], "findings": [...]}."""
    from .record.sinks import rows_to_csv, rows_to_json, write_stdout

    text = rows_to_csv(rows, columns) if fmt is Format.csv else rows_to_json(rows, columns, [f.as_dict() for f in found])
    write_stdout(text if text.endswith("\n") else text + "\n")


@app.command(cls=_Panelled)
def run(
    model: ModelArg = None,
    data: DataOpt = None,
    sample: SampleOpt = None,
    clip: Annotated[str, typer.Option("--clip", help="Clipping strategy: none, value, norm, avg-norm, global, agc, autoclip or zclip.", rich_help_panel="Clipping")] = "none",
    norm: Annotated[Optional[float], typer.Option("--norm", help="Threshold of norm, avg-norm and global clipping.", show_default=False, rich_help_panel="Clipping")] = None,
    value: Annotated[Optional[float], typer.Option("--value", help="Threshold of value clipping: gradients are clipped to [-V, V].", show_default=False, rich_help_panel="Clipping")] = None,
    factor: Annotated[Optional[float], typer.Option("--factor", help="AGC's λ: each unit's gradient norm is kept below λ x its weight norm.  [default: 0.01]", show_default=False, rich_help_panel="Clipping")] = None,
    percentile: Annotated[Optional[float], typer.Option("--percentile", help="AutoClip's p: clip to the p-th percentile of all global norms so far, in (0, 100].  [default: 10]", show_default=False, rich_help_panel="Clipping")] = None,
    z: Annotated[Optional[float], typer.Option("--z", help="ZClip's Z: clip a global norm whose z-score against its running mean exceeds Z.  [default: 2.5]", show_default=False, rich_help_panel="Clipping")] = None,
    csv: CsvOpt = None,
    plot: PlotOpt = None,
    format: FormatOpt = Format.table,
    findings: FindingsOpt = None,
    fail_on: FailOnOpt = None,
    imports: ImportOpt = None, endpoint: EndpointOpt = None, output: OutputOpt = None, x_key: XKeyOpt = None, y_key: YKeyOpt = None,
    target: TargetOpt = None, vocab: VocabOpt = None, num_steps: NumStepsOpt = None, loss: LossOpt = None,
    from_logits: FromLogitsOpt = None, batch_size: BatchOpt = None, steps: StepsOpt = None, epochs: EpochsOpt = None,
    shuffle: ShuffleOpt = None, seed: SeedOpt = None, optimizer: OptimizerOpt = None, opt: OptOpt = None, lr: LrOpt = None,
    lr_decay: LrDecayOpt = None, decay_after_epoch: DecayAfterOpt = None, on_nonfinite: OnNonFiniteOpt = None, sparse_norm: SparseNormOpt = None,
    start_step: StartStepOpt = None, fresh_optimizer: FreshOptimizerOpt = None, checkpoint: CheckpointOpt = None,
    save_checkpoints: SaveCheckpointsOpt = None, checkpoint_every: CheckpointEveryOpt = None,
    fetch_every: FetchEveryOpt = None, xla: XlaOpt = None, spike_factor: SpikeFactorOpt = None,
    spike_window: SpikeWindowOpt = None, spike_floor: SpikeFloorOpt = None, allow_nonfinite_data: AllowNonFiniteOpt = None,
    strategy: StrategyOpt = None, cpu_devices: CpuDevicesOpt = None,
    stream: StreamOpt = None, features: FeaturesOpt = None, shuffle_buffer: ShuffleBufferOpt = None, layers_csv: LayersCsvOpt = None, per_variable: PerVariableOpt = None,
    tensorboard: TensorBoardOpt = None, histogram_every: HistogramEveryOpt = 100,
    quiet: QuietOpt = False,
):
    """Train with one clipping strategy and record loss and gradient norms at every step."""
    from .api import clipping_of
    from .record.rows import CSV_COLUMNS
    from .record.sinks import CsvSink

    clipping = clipping_of(clip, norm=norm, value=value, factor=factor, percentile=percentile, z=z)
    codes = _fail_codes(fail_on)
    given = dict(locals())
    spec = _resolved(locals())
    silent = not _writes(spec)
    if silent:  # a multi-worker run's other workers train along and write nothing
        csv = plot = layers_csv = tensorboard = findings = None
        quiet = True
    _check_plot(plot)
    _check_findings(findings)
    _check_paths(spec, {"--csv": csv, "--plot": plot, "--layers-csv": layers_csv, "--tensorboard": tensorboard,
                        "--save-checkpoints": save_checkpoints, "--findings": findings})
    info: dict = {"per_variable": _per_variable(per_variable, format, layers_csv, tensorboard)}
    from .session import run_line_from_options

    info["command"] = run_line_from_options(given)  # for the compare command a clipped run's verdict gives
    sink = CsvSink(csv, CSV_COLUMNS) if csv else None
    layers_sink = _layers_sink(layers_csv, [sink])
    info["layers_sink"] = layers_sink
    info["tensorboard"] = board = _tensorboard(tensorboard, histogram_every, info)
    title = f"gradwatch run: {_describe(spec)}, clip {clipping.label}"
    diagnosis = _Diagnosis(info)

    def render(results, stopped=None):
        if silent or not results:
            return
        found = diagnosis.of(results)
        if format is Format.table:
            from .report.tables import run_table, verdict_lines
            from .report.diagnosis import print_section
            from .record.sinks import stdout_errors

            shown = diagnosis.variants(results)
            with stdout_errors():
                console = _stdout()
                console.print(escape(title + (f" ({stopped})" if stopped else "")), style="italic")
                console.print(run_table(shown[0].summary))
                for line in verdict_lines(found):
                    console.print(escape(line))
                print_section(console, shown)
        else:
            _emit_rows([row for r in results for row in _tagged(r.clipping, r.rows, info)], CSV_COLUMNS, format, found)

    results = _train_then_keep([sink, layers_sink, board], lambda progress: [_train_one(spec, clipping, sink, quiet, progress, info)],
                               show=render, quiet=quiet, before_commit=lambda results: diagnosis.write(results, findings))
    render(results)
    if plot is not None:
        from .report.tables import plot as draw

        shown = diagnosis.variants(results)  # with the per-layer heat map, as report --layers --plot
        _write_plot(lambda path, kind: draw(shown, path, f"{title}\n{info.get('setup', '')}", kind), plot)
    _fail_if(codes, diagnosis.of(results) if not silent else [])


class _Diagnosis:
    """The findings of a command's results, made once and shared by the table, --format json,
    --findings and --fail-on (so they cannot disagree)."""

    def __init__(self, info: dict):
        self.info = info
        self._key, self._found = None, []

    def variants(self, results):
        from .report.tables import Variant

        return [Variant(r.clipping.strategy, r.clipping.param, r.rows, r.stopped, self.info.get("meta", {}),
                        layers=r.layers, rule=self.info.get("rule")) for r in results]

    def of(self, results):
        from .diagnose.verdict import findings_of

        key = [(id(r), len(r.rows)) for r in results]
        if key != self._key:
            self._key, self._found = key, findings_of(self.variants(results), self.info.get("data_view"),
                                                      self.info.get("command"))
        return self._found

    def write(self, results, path) -> None:
        if path is not None and results:
            _write_findings(path, self.of(results))


def _fail_codes(text):
    from .diagnose.findings import parse_codes

    return parse_codes(text) if text is not None else []


def _check_findings(path: Path | None) -> None:
    from .record.sinks import check_file_target

    if path is not None:
        check_file_target("--findings", path, "findings.json")


def _write_findings(path: Path, found) -> None:
    """The findings as a JSON list, written whole (record.sinks.write_whole); OS errors exit 74."""
    import json

    from .record.sinks import write_whole

    text = json.dumps([f.as_dict() for f in found], indent=1) + "\n"
    write_whole(path, lambda target: target.write_text(text, encoding="utf-8"))


def _fail_if(codes, found) -> None:
    """--fail-on: exit FAIL_ON_EXIT when a finding has one of ``codes`` (every output is written by now)."""
    from .diagnose.findings import FAIL_ON_EXIT, failing

    hits = failing(found, codes)
    if hits:
        named = "; ".join(f"{f.code} ({f.variant or 'comparison'})" for f in hits[:5])
        _stderr().print(escape(f"gradwatch: --fail-on: {counted(len(hits), 'finding')}: {named}"))
        raise typer.Exit(FAIL_ON_EXIT)


def _per_variable(asked: bool | None, format: Format, *outputs) -> bool:
    """Record per-variable norms? Asked for, else when the table or an output needs them."""
    if asked is False and any(outputs):
        raise OptionError("--layers-csv and --tensorboard write per-variable norms; drop --no-per-variable")
    return bool(asked) if asked is not None else (format is Format.table or any(o is not None for o in outputs))


def _tensorboard(path, every: int, info: dict):
    if every < 0:
        raise OptionError(f"`--histogram-every` must be >= 0. Received: histogram_every={every}")
    info["histogram_every"] = every or None
    if path is None:
        return None
    from .record.tensorboard import TensorBoardOutput

    return TensorBoardOutput(path)


def _per_variable_writers(trainer, info: dict):
    """The trainer callbacks that write --layers-csv and --tensorboard (None when neither is asked)."""
    from .diagnose.attribution import layer_rows

    layers, board = info["layers_sink"], info.get("tensorboard")
    if board is not None:
        trainer.capture_every = info["histogram_every"]
    if not (layers or board):
        return None, None

    def write(clipping, rows, norms):
        if layers:
            layers.write(layer_rows(clipping, trainer.variable_names, trainer.variable_shapes, rows, norms))
        if board:
            board.sink(clipping, trainer.variable_names[0]).write(rows, norms)

    def capture(clipping, step, grads):
        board.sink(clipping, trainer.variable_names[0]).histograms(step, grads)

    return write, (capture if board is not None and trainer.capture_every else None)


def _layers_sink(path, opened):
    """The --layers-csv sink (after the others: if it cannot be opened, they are discarded)."""
    from .diagnose import LAYER_COLUMNS
    from .record.sinks import CsvSink

    try:
        return CsvSink(path, LAYER_COLUMNS, "--layers-csv") if path else None
    except BaseException:
        for sink in opened:
            if sink:
                sink.discard()
        raise


def _describe(spec) -> str:
    from .session import describe

    return describe(spec)


def _resolved(params: dict):
    from .session import RunSpec, resolve

    names = RunSpec.__dataclass_fields__.keys()
    return resolve(_spec(**{k: params.get(k) for k in names}))  # a command may take fewer


def _writes(spec) -> bool:
    """Does this process write and print? Yes, but for the non-chief workers of --strategy multiworker."""
    from .train.distribute import check_options, is_chief

    check_options(spec.strategy, spec.cpu_devices)
    return is_chief(spec.strategy)


def _check_paths(spec, outputs: dict) -> None:
    """Every output path against the inputs and each other, before anything is loaded."""
    from .record.sinks import check_outputs

    model_kind = "model folder" if Path(spec.model).is_dir() else "model file"
    data_kind = "data folder" if Path(spec.data).is_dir() else "data file"
    check_outputs(outputs, {model_kind: spec.model, data_kind: spec.data, "vocabulary": spec.vocab})


def _loading(quiet: bool, spec) -> None:
    """On a terminal, say what is happening before TensorFlow's seconds of start-up (logs and
    pipes get the start line alone, so an error stays the only line)."""
    if not quiet and sys.stderr.isatty():
        _stderr().print(escape(f"gradwatch: loading TensorFlow and {_describe(spec)} ..."))


def _train_one(spec, clipping, sink, quiet, progress, info: dict):
    from . import api

    _loading(quiet, spec)
    trainer = api.prepare_trainer(spec, [clipping], info["per_variable"])
    _setup(spec, trainer, info)
    _warn_skipped(trainer)
    _say(quiet, f"gradwatch: training {_describe(spec)} for {_steps(trainer.total_steps)}, clip {clipping.label}; "
                f"{info['setup']}")
    progress.label = f"clip {clipping.label}"
    write = (lambda c, rows: sink.write(_tagged(c, rows, info))) if sink else None
    write_layers, capture = _per_variable_writers(trainer, info)
    try:
        return api.train(trainer, [clipping], on_rows=write, on_progress=lambda c, done, total: progress.update(done, total),
                         on_variables=write_layers, on_capture=capture)[0]
    finally:
        _say_notes(trainer)


def _setup(spec, trainer, info: dict) -> None:
    """What the CSVs record about the run (info["meta"]) and the start line's optimizer and
    loss (info["setup"])."""
    from .api import describe_run
    from .record.rows import setup_text

    info["meta"] = describe_run(spec, trainer)
    info["rule"] = trainer.options.spike_rule
    info["data_view"] = trainer.data_view()
    info["setup"] = setup_text(info["meta"]) + (f"; {trainer.state_text}" if trainer.state_text else "")
    columns = getattr(trainer.data, "columns", None)
    if columns is not None and spec.target is None:  # the CSV's target was a default: say which column it is
        info["setup"] += (f"; target: column {columns[1]!r} (by default the last but sample_weight; --target NAME "
                          "picks another)")
    if trainer.loss_scaling:
        info["setup"] += "; float16 layers: dynamic loss scaling as LossScaleOptimizer"
    if trainer.distribution is not None:
        from .train.distribute import replicas

        info["setup"] += (f"; --strategy {spec.strategy}: {replicas(trainer.distribution)} replicas, "
                          "gradients all-reduced before norms and clipping")


def _tagged(clipping, rows, info: dict) -> list[dict]:
    """Rows as the CSVs hold them: the variant first, what was trained on what last."""
    from .record.rows import META_COLUMNS

    meta = {c: info.get("meta", {}).get(c, "") for c in META_COLUMNS}
    return [{"clip": clipping.strategy, "param": clipping.param, **row, **meta} for row in rows]


def _steps(n: int) -> str:
    return counted(n, "step")


# Where a command is, for the line a signal outside training prints (main).
_phase = {"now": "starting"}
PHASE_TEXT = {
    "starting": " while starting, before the model was loaded; no step was recorded and no output was written",
    "loading": " while loading and preparing the run; no step was recorded and no output was written",
    "reporting": " after training; the outputs were already written",
}


class _RowsKept(Exception):
    """A run stopped by a signal whose rows were kept and said where: main exits 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _train_then_keep(sinks, train, show, quiet, before_commit=None):
    """Train (``train(progress) -> results``) and commit the outputs, keeping every recorded row.

    Ctrl-C, SIGTERM, SIGHUP or ``--on-nonfinite stop``: the rows so far go where they were
    asked for and, for a signal, the summary of what was done is printed before re-raising.
    Any other error: outputs without rows are removed, outputs with rows stay as ``.partial``
    files and the user is told where.
    """
    from .errors import NonFiniteStop

    sinks = [s for s in sinks if s is not None]
    progress = Progress(quiet, "gradwatch")

    def keep(results):  # a finished, interrupted or stopped run: every recorded row where it was asked for
        progress.close()
        if before_commit:
            before_commit(results)
        for s in sinks:
            s.commit()

    _phase["now"] = "loading"  # until the first block: train() loads, traces, then trains
    try:
        results = train(progress)
    except Interrupted as stop:
        keep(stop.results)
        kept = sum(len(r.rows) for r in stop.results)
        where = f" in {', '.join(str(s.path) for s in sinks)}" if sinks else ""
        what = signal_name(stop.signum)
        _stderr().print(escape(f"gradwatch: interrupted by {what}; kept {counted(kept, 'recorded row')} of {counted(len(stop.results), 'variant')}{where}"))
        show(stop.results, f"interrupted by {what} after {_steps(kept)}")
        raise _RowsKept(stop.signum) from None  # not a KeyboardInterrupt: typer would make it a bare 130
    except NonFiniteStop as stop:
        keep([stop.result])
        last = stop.result.rows[-1]["step"] if len(stop.result.rows) else 0
        show([stop.result], f"stopped at step {last}: not finite")
        raise
    except BaseException:
        progress.close()
        for s in sinks:
            s.discard()
        kept = [str(s.kept) for s in sinks if s.kept]
        if kept:
            _stderr().print(escape(f"gradwatch: the rows recorded before the error are in {', '.join(kept)}"))
        raise
    keep(results)
    _phase["now"] = "reporting"
    return results


@app.command(cls=_Panelled)
def compare(
    model: ModelArg = None,
    data: DataOpt = None,
    sample: SampleOpt = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="Strategies, comma separated: value, norm, avg-norm, global, agc, autoclip, zclip.  [default: global]", show_default=False, rich_help_panel="Clipping")] = None,
    thresholds: Annotated[Optional[str], typer.Option("--thresholds", help="Each strategy's parameter, comma separated; 'none' is the unclipped baseline.  [default: none,1,5,10]", show_default=False, rich_help_panel="Clipping")] = None,
    variants_: Annotated[Optional[str], typer.Option("--variants", help="Exactly these variants instead of --clip x --thresholds, e.g. none,global:5,agc:0.01,autoclip:10,zclip:2.5 (a strategy alone takes its default).", show_default=False, rich_help_panel="Clipping")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Add the unclipped baseline when --thresholds lacks 'none'.", rich_help_panel="Clipping")] = True,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Long CSV: one row per variant and step, with clip and param columns.", show_default=False, rich_help_panel="Outputs")] = None,
    summary_csv: Annotated[Optional[Path], typer.Option("--summary-csv", help="The summary table, one row per variant.", show_default=False, rich_help_panel="Outputs")] = None,
    plot: PlotOpt = None,
    format: FormatOpt = Format.table,
    findings: FindingsOpt = None,
    fail_on: FailOnOpt = None,
    imports: ImportOpt = None, endpoint: EndpointOpt = None, output: OutputOpt = None, x_key: XKeyOpt = None, y_key: YKeyOpt = None,
    target: TargetOpt = None, vocab: VocabOpt = None, num_steps: NumStepsOpt = None, loss: LossOpt = None,
    from_logits: FromLogitsOpt = None, batch_size: BatchOpt = None, steps: StepsOpt = None, epochs: EpochsOpt = None,
    shuffle: ShuffleOpt = None, seed: SeedOpt = None, optimizer: OptimizerOpt = None, opt: OptOpt = None, lr: LrOpt = None,
    lr_decay: LrDecayOpt = None, decay_after_epoch: DecayAfterOpt = None, on_nonfinite: OnNonFiniteOpt = None, sparse_norm: SparseNormOpt = None,
    start_step: StartStepOpt = None, fresh_optimizer: FreshOptimizerOpt = None, checkpoint: CheckpointOpt = None,
    fetch_every: FetchEveryOpt = None, xla: XlaOpt = None, spike_factor: SpikeFactorOpt = None,
    spike_window: SpikeWindowOpt = None, spike_floor: SpikeFloorOpt = None, allow_nonfinite_data: AllowNonFiniteOpt = None,
    strategy: StrategyOpt = None, cpu_devices: CpuDevicesOpt = None,
    stream: StreamOpt = None, features: FeaturesOpt = None, shuffle_buffer: ShuffleBufferOpt = None, layers_csv: LayersCsvOpt = None, per_variable: PerVariableOpt = None,
    tensorboard: TensorBoardOpt = None, histogram_every: HistogramEveryOpt = 100,
    quiet: QuietOpt = False,
):
    """Train every strategy x threshold (and the unclipped baseline) from the same start on the same batches."""
    from .clip import parse_variant_list, parse_variants
    from .record.rows import CSV_COLUMNS
    from .record.sinks import CsvSink
    from .report.tables import COMPARE_COLUMNS

    if variants_ is not None:
        if clip is not None or thresholds is not None:
            raise OptionError("give --variants, or --clip with --thresholds, not both")
        variants = parse_variant_list(variants_)
    else:
        variants = parse_variants("global" if clip is None else clip,
                                  "none,1,5,10" if thresholds is None else thresholds, baseline)
    codes = _fail_codes(fail_on)
    spec = _resolved(locals())
    silent = not _writes(spec)
    if silent:  # a multi-worker run's other workers train along and write nothing
        csv = summary_csv = plot = layers_csv = tensorboard = findings = None
        quiet = True
    _check_plot(plot)
    _check_findings(findings)
    _check_paths(spec, {"--csv": csv, "--summary-csv": summary_csv, "--plot": plot, "--layers-csv": layers_csv,
                        "--tensorboard": tensorboard, "--findings": findings})
    info: dict = {"per_variable": _per_variable(per_variable, format, layers_csv, tensorboard)}
    sink = CsvSink(csv, CSV_COLUMNS) if csv else None
    try:
        summary_sink = CsvSink(summary_csv, COMPARE_COLUMNS, "--summary-csv") if summary_csv else None
    except BaseException:
        if sink:
            sink.discard()  # nothing recorded yet: leave no empty .partial behind
        raise
    layers_sink = info["layers_sink"] = _layers_sink(layers_csv, [sink, summary_sink])
    info["tensorboard"] = board = _tensorboard(tensorboard, histogram_every, info)
    title = f"gradwatch compare: {_describe(spec)}"
    diagnosis = _Diagnosis(info)

    def render(results, stopped=None):
        from .report.tables import print_compare, verdict_lines

        if silent or not results:
            return
        found = diagnosis.of(results)
        if format is Format.table:
            from .report.diagnosis import print_section
            from .record.sinks import stdout_errors

            variants_shown = diagnosis.variants(results)
            with stdout_errors():
                console = _stdout()
                print_compare(console, variants_shown, title + (f" ({stopped})" if stopped else ""))
                for line in verdict_lines(found, single=len(variants_shown) == 1):
                    console.print(escape(line))
                print_section(console, variants_shown)
        else:
            _emit_rows([row for r in results for row in _tagged(r.clipping, r.rows, info)], CSV_COLUMNS, format, found)

    def record(results):
        if summary_sink:
            from .report.tables import summary_rows

            summary_sink.write(summary_rows(diagnosis.variants(results)))
        diagnosis.write(results, findings)

    train = lambda progress: _train_many(spec, variants, sink, quiet, progress, info)  # noqa: E731
    results = _train_then_keep([sink, summary_sink, layers_sink, board], train, show=render, quiet=quiet, before_commit=record)
    render(results)
    if plot is not None:
        from .report.tables import plot as draw

        shown = diagnosis.variants(results)
        _write_plot(lambda path, kind: draw(shown, path, f"{title}\n{info.get('setup', '')}", kind, diagnosis.of(results)), plot)
    _fail_if(codes, diagnosis.of(results) if not silent else [])


def _train_many(spec, variants, sink, quiet, progress, info: dict):
    from . import api

    _loading(quiet, spec)
    trainer = api.prepare_trainer(spec, variants, info["per_variable"])
    _setup(spec, trainer, info)
    _warn_skipped(trainer)
    labels = ", ".join(v.label for v in variants)
    _say(quiet, f"gradwatch: comparing {counted(len(variants), 'variant')} ({labels}) on {_describe(spec)}, {_steps(trainer.total_steps)} each; "
                f"{info['setup']}")

    def write(clipping, rows):
        if sink:
            sink.write(_tagged(clipping, rows, info))

    def advance(clipping, done, total):
        # One bar over the whole comparison, so its time estimate covers every variant.
        k = variants.index(clipping)
        progress.update(k * total + done, len(variants) * total, f"variant {k + 1}/{len(variants)}: clip {clipping.label}")

    def stopped(clipping, error):
        step = error.result.rows[-1]["step"]
        progress.close()
        _stderr().print(escape(f"gradwatch: variant {clipping.label} stopped at step {step}: loss or gradient not finite "
                               "(--on-nonfinite stop); the other variants go on"))

    write_layers, capture = _per_variable_writers(trainer, info)
    try:
        return api.train(trainer, variants, on_rows=write, on_progress=advance, on_stop=stopped,
                         on_variables=write_layers, on_capture=capture)
    finally:
        _say_notes(trainer)


def _say_notes(trainer) -> None:
    """What the trainer decided by itself while training (the automatic XLA falling back)."""
    for note in getattr(trainer, "notes", []):
        _stderr().print(escape(f"gradwatch: note: {note}"))


@app.command(cls=_Panelled)
def report(
    file: Annotated[Path, typer.Argument(help="CSV written by `gradwatch run --csv`, `compare --csv` or `compare --summary-csv`.", show_default=False)],
    plot: PlotOpt = None,
    layers: Annotated[Optional[Path], typer.Option("--layers", help="The --layers-csv file of the same run: rebuild the spikes and what drove them, and the per-layer table.", show_default=False)] = None,
    findings: FindingsOpt = None,
    fail_on: FailOnOpt = None,
):
    """Re-render the summary and verdict of a saved run or comparison, without training."""
    from .diagnose.verdict import findings_of
    from .record.rows import META_COLUMNS, describe_meta, is_summary_csv, read_rows, setup_text, split_variants
    from .report.tables import Variant, plot as draw, print_compare, run_table, verdict_lines
    from .record.sinks import check_outputs, stdout_errors

    codes = _fail_codes(fail_on)
    _check_plot(plot)
    _check_findings(findings)
    check_outputs({"--plot": plot, "--findings": findings}, {"CSV it reads": file, "layers CSV it reads": layers})
    if is_summary_csv(file):
        return _report_summary(file, plot, findings, codes)
    rows, unfinished = read_rows(file), file.name.endswith(".partial")
    groups = split_variants(rows)
    watches = {}
    if layers is not None:
        from .diagnose.attribution import read_layers

        watches = read_layers(layers, groups)
    variants = [Variant(clip, param, group, meta={c: group[0][c] for c in META_COLUMNS}, layers=watches.get((clip, param)))
                for (clip, param), group in groups.items()]
    meta = variants[0].meta
    note = " (a .partial file: the run did not finish)" if unfinished else ""
    title = f"gradwatch report: {file.name}{note}"
    if meta["model"] or meta["data"]:
        title += f": {describe_meta(meta)}"
    single = len(variants) == 1
    if single and variants[0].clip != "run":
        title += f", clip {variants[0].label}"
    setup = setup_text(meta)
    found = findings_of(variants)
    if findings is not None:
        _write_findings(findings, found)
    with stdout_errors():
        console = _stdout()
        if single:
            console.print(escape(title), style="italic")
            if setup:
                console.print(escape(setup), style="italic")
            console.print(run_table(variants[0].summary))
        else:
            if setup:
                console.print(escape(setup), style="italic")
            print_compare(console, variants, title)
        for line in verdict_lines(found, single):
            console.print(escape(line))
        from .report.diagnosis import print_section

        print_section(console, variants)
    if unfinished:
        _stderr().print(escape(f"gradwatch: {file} holds the rows of a run that did not finish ({counted(len(rows), 'row')})"))
    if plot is not None:
        full = f"{title}\n{setup}" if setup else title
        _write_plot(lambda path, kind: draw(variants, path, full, kind, found), plot)
    _fail_if(codes, found)


def _report_summary(file: Path, plot: Path | None, findings: Path | None, codes: list) -> None:
    """`report` on the file of `compare --summary-csv`: its table again; the rest needs the steps."""
    from .diagnose.findings import run_findings
    from .record.rows import META_COLUMNS, describe_meta, read_summary, setup_text
    from .report.tables import Variant, print_compare
    from .record.sinks import stdout_errors

    if plot is not None:
        raise OptionError(f"{file} is the summary of a comparison (compare --summary-csv), one row per variant: "
                          "--plot needs the per-step CSV that compare --csv writes")
    rows = read_summary(file)
    variants = [Variant(r["clip"], r["param"], [], meta={c: r[c] for c in META_COLUMNS}, given_summary=r) for r in rows]
    meta = variants[0].meta
    title = f"gradwatch report: {file.name} (summary of a comparison)"
    if meta["model"] or meta["data"]:
        title += f": {describe_meta(meta)}"
    with stdout_errors():
        console = _stdout()
        if setup_text(meta):
            console.print(escape(setup_text(meta)), style="italic")
        print_compare(console, variants, title)
        console.print("This file holds one summary row per variant; the verdict, the loss sparkline and --plot "
                      "need the per-step CSV that compare --csv writes.")
    found = [f for v in variants for f in run_findings(v)]
    if findings is not None:
        _write_findings(findings, found)
    _fail_if(codes, found)


def _check_plot(plot: Path | None) -> None:
    from .report.tables import PLOT_FORMATS
    from .record.sinks import check_file_target

    if plot is None:
        return
    check_file_target("--plot", plot, "steps.png")
    if plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise OptionError(f"--plot writes {', '.join(PLOT_FORMATS)}; give a file name ending in one of them (got {plot})")


def _write_plot(draw, plot: Path) -> None:
    """Draw the plot whole (record.sinks.write_whole); OS errors exit 74."""
    from .record.sinks import write_whole

    kind = plot.suffix.lower().lstrip(".")
    write_whole(plot, lambda target: draw(str(target), kind), suffix=f".{kind}")
    _stderr().print(escape(f"gradwatch: wrote {plot}"))


PROBE_STEPS = 100  # suggest's unclipped probe, unless --steps or --epochs says otherwise


@app.command(cls=_Panelled)
def suggest(
    model: Annotated[Optional[str], typer.Argument(help="SavedModel folder or .keras file to probe, or the CSV of a saved unclipped run (`run --csv`, or a compare CSV with the 'none' baseline).", show_default=False)] = None,
    data: DataOpt = None,
    sample: SampleOpt = None,
    verify: Annotated[bool, typer.Option("--verify", help="Also compare the candidates (and no clipping) over the probe's steps and pick the calmest.")] = False,
    layers: Annotated[Optional[Path], typer.Option("--layers", help="With a run CSV: its --layers-csv file, to say which variables dominate the norm.", show_default=False)] = None,
    imports: ImportOpt = None, endpoint: EndpointOpt = None, output: OutputOpt = None, x_key: XKeyOpt = None, y_key: YKeyOpt = None,
    target: TargetOpt = None, vocab: VocabOpt = None, num_steps: NumStepsOpt = None, loss: LossOpt = None,
    from_logits: FromLogitsOpt = None, batch_size: BatchOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help=f"Steps of the unclipped probe.  [default: {PROBE_STEPS}]", show_default=False)] = None,
    epochs: EpochsOpt = None,
    shuffle: ShuffleOpt = None, seed: SeedOpt = None, optimizer: OptimizerOpt = None, opt: OptOpt = None, lr: LrOpt = None,
    lr_decay: LrDecayOpt = None, decay_after_epoch: DecayAfterOpt = None, on_nonfinite: OnNonFiniteOpt = None, sparse_norm: SparseNormOpt = None,
    start_step: StartStepOpt = None, fresh_optimizer: FreshOptimizerOpt = None, checkpoint: CheckpointOpt = None,
    fetch_every: FetchEveryOpt = None, xla: XlaOpt = None, spike_factor: SpikeFactorOpt = None,
    spike_window: SpikeWindowOpt = None, spike_floor: SpikeFloorOpt = None, allow_nonfinite_data: AllowNonFiniteOpt = None,
    strategy: StrategyOpt = None, cpu_devices: CpuDevicesOpt = None,
    stream: StreamOpt = None, features: FeaturesOpt = None, shuffle_buffer: ShuffleBufferOpt = None, quiet: QuietOpt = False,
):
    """Propose a clip_by_global_norm threshold from an unclipped probe (or a saved unclipped run)."""
    if model is not None and model.lower().endswith((".csv", ".csv.partial")):
        if not Path(model).is_file():
            raise OptionError(f"no such file: {model}; give the CSV of a saved unclipped run (gradwatch run --csv)")
        return _suggest_from_csv(Path(model), layers, verify)
    if layers is not None:
        raise OptionError("--layers goes with a run CSV (gradwatch suggest RUN.csv --layers LAYERS.csv); drop it")
    from .clip import Clipping

    given = dict(locals())
    if steps is None and epochs is None:
        steps = PROBE_STEPS
    spec = _resolved(locals())
    _check_paths(spec, {})
    info: dict = {"per_variable": True, "layers_sink": None}

    def probe(progress):
        from .session import prepare
        from .train.loop import compare as compare_runs

        _loading(quiet, spec)
        trainer = prepare(spec)
        from .diagnose.suggest import MIN_CALM

        if trainer.total_steps < MIN_CALM:  # no proposal could come of it: say so before training
            raise OptionError(f"suggest needs a probe of at least {MIN_CALM} steps (a proposal rests on {MIN_CALM} "
                              f"calm ones), and this one has {trainer.total_steps}; give --steps {MIN_CALM} or more")
        _setup(spec, trainer, info)
        trainer.per_variable = True
        _warn_skipped(trainer)
        _say(quiet, f"gradwatch: probing {_describe(spec)} unclipped for {_steps(trainer.total_steps)}; {info['setup']}")
        progress.label = "unclipped probe"
        base = trainer.run(Clipping("none", None), on_progress=progress.update)
        from .diagnose.suggest import TooFewCalmSteps

        try:
            found = _suggestion(base.rows, base.layers, spec.sparse_norm, raw=True)
            info["early"] = None
        except TooFewCalmSteps as early:  # broke down at once: measure the norms of a clipped training
            if early.first is None:  # nothing broke down: the probe is just too short
                raise GradwatchError(str(early)) from None
            info["early"] = early
            _say(quiet, f"gradwatch: the unclipped probe was calm for only {counted(early.calm, 'step')}; probing again, "
                        "clipped by AutoClip (p=10)")
            progress.label = "AutoClip probe"
            clipped = trainer.run(Clipping("autoclip", 10.0), on_progress=progress.update)
            try:
                found = _suggestion(clipped.rows, None, spec.sparse_norm, clipped_probe="an AutoClip (p=10) probe",
                                    raw=True)
            except TooFewCalmSteps as again:
                broken = sum(1 for r in base.rows if r["nonfinite"])
                raise GradwatchError(
                    f"no threshold proposed: the unclipped probe broke down at step {early.first} (non-finite on "
                    f"{broken} of {len(base.rows)} steps) and so did the probe clipped by AutoClip (p=10), at step "
                    f"{again.first}, leaving {counted(again.calm, 'calm step')}, fewer than the {MIN_CALM} a proposal rests on; "
                    "lower --lr and run suggest again, or compare thresholds directly with gradwatch compare "
                    "--thresholds none,1,5,10") from None
            info["probe_rows"] = clipped.rows
        if not verify:
            return [base], found, None
        candidates = [Clipping("global", t) for t, _, _ in found.candidates]
        _say(quiet, f"gradwatch: verifying global {', '.join(f'{c.param:g}' for c in candidates)} over the same steps")

        def advance(clipping, done, total):
            k = candidates.index(clipping)
            progress.update(k * total + done, len(candidates) * total, f"candidate {k + 1}/{len(candidates)}: clip {clipping.label}")

        return [base], found, compare_runs(trainer, candidates, on_progress=advance)

    runs, found, checked = _train_then_keep([], lambda progress: [probe(progress)], show=lambda *a, **k: None, quiet=quiet)[0]
    from .report.tables import calmest
    from .session import command_line, run_line_from_options

    threshold = found.threshold if not checked else calmest(checked).clipping.param
    line = command_line(run_line_from_options(given), "global", threshold)
    _print_suggestion(found, runs[0].layers, checked, runs[0].rows, line, info.get("meta"), info.get("early"),
                      info.get("probe_rows"))


def _suggestion(rows, watch, sparse_norm=None, clipped_probe=None, raw=False):
    """suggest_threshold; too few calm steps is a one-line error (exit 2), or raised as it is (``raw``)."""
    from .diagnose import suggest_threshold
    from .diagnose.suggest import TooFewCalmSteps

    grad_spikes = [s.step for s in watch.spikes if "grad" in s.kinds] if watch is not None else None
    try:
        return suggest_threshold(rows, grad_spikes, sparse_norm, clipped_probe)
    except TooFewCalmSteps as exc:
        if raw:
            raise
        raise GradwatchError(str(exc)) from None


def _suggest_from_csv(path: Path, layers: Path | None, verify: bool) -> None:
    from .diagnose.suggest import unclipped_variant
    from .record.rows import read_rows, split_variants
    from .record.rows import run_line_from_meta
    from .session import command_line

    if verify:
        raise OptionError("--verify trains: give the MODEL and --data instead of a CSV")
    groups = split_variants(read_rows(path))
    key = unclipped_variant(groups, path)
    rows = groups[key]
    watch = None
    if layers is not None:
        from .diagnose.attribution import read_layers

        watch = read_layers(layers, {key: rows}).get(key)
    found = _suggestion(rows, watch)
    _print_suggestion(found, watch, None, rows, command_line(run_line_from_meta(rows[0]), "global", found.threshold))


def _print_suggestion(found, watch, checked, rows, line: str, meta: dict | None = None, early=None,
                      probe_rows=None) -> None:
    """``rows``: the unclipped probe; ``probe_rows``: the AutoClip probe the proposal came from
    when the unclipped one broke down at once (``early``)."""
    import numpy as np
    from rich.table import Table

    from .diagnose.verdict import findings_of
    from .report.tables import Variant, fmt, print_compare, verdict_lines
    from .record.sinks import stdout_errors

    with stdout_errors():
        console = _stdout()
        spikes = f"first spike or non-finite step at step {found.first_spike}" if found.first_spike else "no spike"
        if early is not None:
            spikes = (f"first spike or non-finite step at step {early.first}; then an AutoClip probe of "
                      f"{len(probe_rows or rows)} steps from the same start")
        console.print(escape(f"gradwatch suggest: an unclipped probe of {len(rows)} steps, {spikes}"), style="italic")
        where = "the AutoClip probe" if early is not None else "unclipped"
        table = Table(title=f"global gradient norm, {where}", header_style="bold", title_justify="left")
        for name, justify in (("steps", "left"), ("n", "right"), ("median", "right"), ("p90", "right"), ("max", "right")):
            table.add_column(name, justify=justify, no_wrap=True)
        calm = "calm (before the first spike)" if found.first_spike and found.calm_steps < len(rows) else "calm"
        if early is not None:
            calm = "AutoClip probe" + (" (before its first loss spike)" if found.first_spike else "")
        table.add_row(calm, str(found.calm_steps), *[fmt(found.stats["calm"][k]) for k in ("median", "p90", "max")])
        finite = sum(1 for r in (probe_rows or rows) if math.isfinite(r["grad_norm"]))
        table.add_row("all finite", str(finite), *[fmt(found.stats["all"][k]) for k in ("median", "p90", "max")])
        console.print(table)
        table = Table(title="candidates: how often each would clip", header_style="bold", title_justify="left")
        for name in ("--norm", "calm steps clipped", "all steps clipped"):
            table.add_column(name, justify="right", no_wrap=True)
        for t, calm_pct, all_pct in found.candidates:
            mark = " (proposed)" if t == found.threshold else ""
            table.add_row(f"{t:g}{mark}", f"{calm_pct:.0f} %", f"{all_pct:.0f} %")
        console.print(table)
        console.print(escape(f"Rule: the threshold is the {found.rule}, to two significant digits "
                             "(candidates: half, once and twice that)."))
        if found.first_spike is None and early is None:
            console.print(escape(f"No spike and no non-finite step in the probe: these {len(rows)} steps need no "
                                 "clipping; the proposal is a guard against bursts that come later."))
        for finding_line in verdict_lines(found.findings(rows, early))[1:]:
            console.print(escape(finding_line.strip()))
        if watch is not None:
            shares = watch.mean_shares()
            order = [k for k in np.argsort(-np.nan_to_num(shares, nan=-1.0))[:3] if math.isfinite(shares[k])]
            if order:
                named = ", ".join(f"{watch.variables[k]} {100 * shares[k]:.0f}%" for k in order)
                console.print(escape(f"The norm is dominated by: {named} (mean share of the norm² over the probe)."))
        if found.keras is not None:
            from .diagnose.suggest import keras_sentence

            console.print(escape(keras_sentence(found.threshold, found.keras)))
        if checked:
            shown = [Variant("none", None, rows, meta=meta or {})] + [
                Variant(r.clipping.strategy, r.clipping.param, r.rows, meta=meta or {}) for r in checked]
            print_compare(console, shown, "verification: the candidates over the probe's steps")
            for verdict in verdict_lines(findings_of(shown), single=False):
                console.print(escape(verdict))
            from .report.tables import calmest

            console.print(escape(f"Calmest candidate: global {calmest(checked).clipping.param:g}."))
        console.print(escape(f"Try: {line}"))


@app.command()
def samples():
    """List the built-in samples: what each shows and the command to try."""
    from rich.table import Table

    from .samples import DEFAULT, registry

    table = Table(title="gradwatch samples", header_style="bold")
    table.add_column("name", no_wrap=True)
    table.add_column("what it shows", ratio=3)
    table.add_column("try", ratio=2, overflow="fold")
    for s in registry().values():
        name = f"{s.name} (default)" if s.name == DEFAULT else s.name
        table.add_row(escape(name), escape(s.summary), escape(s.command))
    _stdout().print(table)


# --- entry point: every error is one line on stderr ---------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code.

    0 ok, 2 bad input, 3 non-finite stop, 74 an output could not be written, 130 Ctrl-C,
    143 SIGTERM, 129 SIGHUP (128 + the signal), 141 standard output closed by its reader.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("GRADWATCH_DEBUG"))
    _phase["now"] = "starting"
    from .signals import first_received, stop_signals_unwind

    with stop_signals_unwind():
        try:
            _refuse_blank(args)
            result = app(args=args, prog_name="gradwatch", standalone_mode=False)
            from .record.sinks import stdout_errors

            if result == 130 and first_received() is not None:  # typer turns a Ctrl-C into a return of 130
                return _stopped_by(first_received())
            with stdout_errors():
                sys.stdout.flush()
            return result if isinstance(result, int) else 0
        except typer.Exit as exc:
            if first_received() is not None and exc.exit_code == 130:
                return _stopped_by(first_received())
            return exc.exit_code
        except _RowsKept as exc:
            return 128 + exc.signum  # said where the rows were kept (_train_then_keep)
        except (typer.Abort, KeyboardInterrupt):
            return _stopped_by(first_received() or 2)
        except (BrokenPipe, BrokenPipeError):
            _silence_stdout()
            return 141  # as a Unix tool killed by SIGPIPE
        except GradwatchError as exc:
            if debug:
                raise
            _error(str(exc))
            return exc.exit_code
        except Exception as exc:
            if first_received() is not None:  # e.g. TensorFlow's import wraps the signal in an ImportError
                return _stopped_by(first_received())
            if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
                sys.stdout.write(exc.ctx.get_help() + "\n")  # `gradwatch` alone: the help, readable, as typer does
                return 2
            if _is_usage_error(exc):
                ctx = getattr(exc, "ctx", None)
                command = ctx.command_path if ctx is not None else "gradwatch"
                _error(f"{exc.format_message()} (see `{command} --help`)")
                return 2
            if isinstance(exc, OSError) and exc.errno is not None and getattr(exc, "filename", None):
                _error(f"cannot write {exc.filename}: {exc.strerror}")  # an output the library did not wrap
                return 74
            if debug:
                raise
            _error(f"unexpected {type(exc).__name__}: {exc} (set GRADWATCH_DEBUG=1 for the traceback, and please report it)")
            return 1


def _refuse_blank(args: list[str]) -> None:
    """An empty or all-blank argument (``--csv "$OUT"`` with OUT unset) is a mistake, never a value:
    as a path it would become '.' or a file named by spaces, as a name match nothing."""
    for i, arg in enumerate(args):
        option, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if arg.startswith("--") and not eq:
            continue
        if blank(value):
            what = f"the value of {option}" if option else f"the argument after {args[i - 1]}" if i else "the first argument"
            raise GradwatchError(f"{what} is {blank(value)} (an unset shell variable?); give it a value or leave it out")


def _stopped_by(signum: int) -> int:
    """A signal outside a training block: one line saying what it stopped, and 128 + the signal."""
    what = signal_name(signum)
    sys.stderr.write(f"gradwatch: interrupted by {what}{PHASE_TEXT.get(_phase['now'], '')}\n")
    sys.stderr.flush()
    return 128 + signum


def _silence_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so the interpreter's final flush
    does not print a BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _is_usage_error(exc: Exception) -> bool:
    """Typer's usage errors (click's, vendored in recent typer): exit code 2 and a message."""
    return getattr(exc, "exit_code", None) == 2 and callable(getattr(exc, "format_message", None))


def _error(message: str) -> None:
    sys.stderr.write(f"gradwatch: error: {one_line(message)}\n")
    sys.stderr.flush()


def entry() -> None:
    code = main()
    if "tensorflow" in sys.modules:
        # TensorFlow's interpreter teardown takes about a second and does nothing for us: every
        # file gradwatch writes is complete and renamed into place by now. Flush and leave.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)
