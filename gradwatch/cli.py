"""The typer app: parse options, call the library, render. Errors become one stderr line + exit 2.

TensorFlow is imported only inside the commands that train, so `--help`, `samples` and
`report` start fast. Set GRADWATCH_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

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
from .errors import BrokenPipe, GradwatchError, Interrupted, OptionError, Signalled, one_line

app = typer.Typer(
    name="gradwatch",
    help="Watch gradients while training a TensorFlow model, and see which clipping stops the loss from jumping.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


class OnNonFinite(str, Enum):
    skip = "skip"
    stop = "stop"


# --- options shared by run and compare (one definition each) -------------------------------------
ModelArg = Annotated[Optional[str], typer.Argument(help="SavedModel folder or .keras file. Omit it to train a built-in sample.", show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Data: .npz, .csv, .txt corpus, or a tf.data.Dataset.save folder.", show_default=False)]
SampleOpt = Annotated[Optional[str], typer.Option("--sample", help="Built-in sample to train (see `gradwatch samples`); the default is ptb-small.", show_default=False)]
EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint", help="SavedModel function or signature to call (default: __call__, serve, serving_default).", show_default=False)]
OutputOpt = Annotated[Optional[str], typer.Option("--output", help="Output name, for endpoints that return a dict of several.", show_default=False)]
XKeyOpt = Annotated[Optional[str], typer.Option("--x-key", help="Array of inputs in an .npz file.  [default: x]", show_default=False)]
YKeyOpt = Annotated[Optional[str], typer.Option("--y-key", help="Array of targets in an .npz file.  [default: y]", show_default=False)]
TargetOpt = Annotated[Optional[str], typer.Option("--target", help="Target column of a .csv file.  [default: the last column]", show_default=False)]
VocabOpt = Annotated[Optional[str], typer.Option("--vocab", help="Vocabulary for a .txt corpus, one word a line.  [default: the model's assets/vocab.txt]", show_default=False)]
NumStepsOpt = Annotated[Optional[int], typer.Option("--num-steps", help="Window length for a .txt corpus.  [default: the model's input length]", show_default=False)]
LossOpt = Annotated[Optional[str], typer.Option("--loss", help="Any Keras loss identifier: mse, huber, binary_crossentropy, sparse_categorical_crossentropy, kl_divergence, ...  [default: the model's compiled loss, or its loss(inputs, targets)]", show_default=False)]
FromLogitsOpt = Annotated[Optional[bool], typer.Option("--from-logits", help="The model outputs logits (crossentropy losses).", show_default=False)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Rows per step.  [default: 32, or the sample's]", show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Number of training steps.  [default: one epoch, or the sample's]", show_default=False)]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs (instead of --steps).", show_default=False)]
ShuffleOpt = Annotated[Optional[bool], typer.Option("--shuffle/--no-shuffle", help="Shuffle rows each epoch.  [default: shuffle arrays, keep a text corpus in order]", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of the shuffle order and TF's random ops.  [default: 0]", show_default=False)]
OptimizerOpt = Annotated[Optional[str], typer.Option("--optimizer", help="Any Keras optimizer identifier: sgd, momentum (SGD, 0.9), adam, adamw, rmsprop, nadam, lion, ...  [default: the model's compiled optimizer, else sgd]", show_default=False)]
OptOpt = Annotated[Optional[list[str]], typer.Option("--opt", help="An optimizer hyperparameter NAME=VALUE, e.g. --opt beta_1=0.8 --opt weight_decay=1e-4 (repeat it).", show_default=False)]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate.  [default: the optimizer's own (compiled), else 0.01, or the sample's]", show_default=False)]
LrDecayOpt = Annotated[Optional[float], typer.Option("--lr-decay", help="Multiply the learning rate by this every epoch after --decay-after-epoch.", show_default=False)]
DecayAfterOpt = Annotated[Optional[int], typer.Option("--decay-after-epoch", help="Epochs at the full learning rate before --lr-decay applies.  [default: 1]", show_default=False)]
OnNonFiniteOpt = Annotated[Optional[OnNonFinite], typer.Option("--on-nonfinite", help="skip: leave the weights as they were and go on; stop: end the run (compare: that variant) after writing its rows, exit 3 in run.  [default: skip]", show_default=False)]
FetchEveryOpt = Annotated[Optional[int], typer.Option("--fetch-every", help="Fetch recorded values from the device every N steps (one row per step either way).  [default: auto, about every 0.25 s]", show_default=False)]
XlaOpt = Annotated[Optional[bool], typer.Option("--xla/--no-xla", help="Compile the training step with XLA.  [default: off]", show_default=False)]
SpikeFactorOpt = Annotated[Optional[float], typer.Option("--spike-factor", help="A spike is a loss above FACTOR x the median of the previous --spike-window losses.  [default: 2]", show_default=False)]
SpikeWindowOpt = Annotated[Optional[int], typer.Option("--spike-window", help="Steps in the spike rule's rolling median.  [default: 20]", show_default=False)]
AllowNonFiniteOpt = Annotated[Optional[bool], typer.Option("--allow-nonfinite-data", help="Train even when the data holds NaN or inf (the verdict then blames the data, not the training).", show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Also draw loss, grad norm and fraction clipped per step into this .png, .svg or .pdf.", show_default=False)]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Write every step's row to this CSV, as the run goes.", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", help="table: summary and verdict; csv/json: the rows, on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or start line on stderr.")]


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    # Piped or redirected output is read later in an editor or a log: tables take the width their
    # content needs and sentences stay on one line (no hard wrap).
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return Console(highlight=False, width=100_000, soft_wrap=True)
    return Console(highlight=False)


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
    options["opt"] = tuple(options["opt"]) if options.get("opt") else None
    return RunSpec(**options)


def _say(quiet: bool, message: str):
    if not quiet:
        _stderr().print(escape(message))


def _warn_skipped(trainer):
    for warning in trainer.model.warnings:
        _stderr().print(escape(f"gradwatch: warning: {warning}"))
    if trainer.skipped:
        _stderr().print(escape(f"gradwatch: warning: no gradient reaches {', '.join(trainer.skipped)}; left out of training and norms"))


def _emit_rows(rows, columns, fmt: Format):
    from .sinks import rows_to_csv, rows_to_json, write_stdout

    text = rows_to_csv(rows, columns) if fmt is Format.csv else rows_to_json(rows, columns)
    write_stdout(text if text.endswith("\n") else text + "\n")


@app.command()
def run(
    model: ModelArg = None,
    data: DataOpt = None,
    sample: SampleOpt = None,
    clip: Annotated[str, typer.Option("--clip", help="Clipping strategy: none, value, norm, avg-norm, global, agc, autoclip or zclip.")] = "none",
    norm: Annotated[Optional[float], typer.Option("--norm", help="Threshold of norm, avg-norm and global clipping.", show_default=False)] = None,
    value: Annotated[Optional[float], typer.Option("--value", help="Threshold of value clipping: gradients are clipped to [-V, V].", show_default=False)] = None,
    factor: Annotated[Optional[float], typer.Option("--factor", help="AGC's λ: each unit's gradient norm is kept below λ x its weight norm.  [default: 0.01]", show_default=False)] = None,
    percentile: Annotated[Optional[float], typer.Option("--percentile", help="AutoClip's p: clip to the p-th percentile of all global norms so far, in (0, 100].  [default: 10]", show_default=False)] = None,
    z: Annotated[Optional[float], typer.Option("--z", help="ZClip's Z: clip a global norm whose z-score against its running mean exceeds Z.  [default: 2.5]", show_default=False)] = None,
    csv: CsvOpt = None,
    plot: PlotOpt = None,
    format: FormatOpt = Format.table,
    endpoint: EndpointOpt = None, output: OutputOpt = None, x_key: XKeyOpt = None, y_key: YKeyOpt = None,
    target: TargetOpt = None, vocab: VocabOpt = None, num_steps: NumStepsOpt = None, loss: LossOpt = None,
    from_logits: FromLogitsOpt = None, batch_size: BatchOpt = None, steps: StepsOpt = None, epochs: EpochsOpt = None,
    shuffle: ShuffleOpt = None, seed: SeedOpt = None, optimizer: OptimizerOpt = None, opt: OptOpt = None, lr: LrOpt = None,
    lr_decay: LrDecayOpt = None, decay_after_epoch: DecayAfterOpt = None, on_nonfinite: OnNonFiniteOpt = None,
    fetch_every: FetchEveryOpt = None, xla: XlaOpt = None, spike_factor: SpikeFactorOpt = None,
    spike_window: SpikeWindowOpt = None, allow_nonfinite_data: AllowNonFiniteOpt = None, quiet: QuietOpt = False,
):
    """Train with one clipping strategy and record loss and gradient norms at every step."""
    from .clip import STRATEGIES, Clipping
    from .records import CSV_COLUMNS
    from .sinks import CsvSink

    if clip not in STRATEGIES:
        raise OptionError(f"unknown clipping strategy {clip!r}; choose one of {', '.join(STRATEGIES)}")
    option = STRATEGIES[clip].option
    given = {"norm": norm, "value": value, "factor": factor, "percentile": percentile, "z": z}
    extra = [f"--{name}" for name, v in given.items() if v is not None and name != option]
    if extra:
        takes = f"--{option}" if option else "no parameter"
        raise OptionError(f"--clip {clip} takes {takes}, not {', '.join(extra)}; drop {', '.join(extra)}")
    clipping = Clipping(clip, given.get(option))
    spec = _resolved(locals())
    _check_plot(plot)
    _check_paths(spec, {"--csv": csv, "--plot": plot})
    sink = CsvSink(csv, CSV_COLUMNS) if csv else None
    title = f"gradwatch run: {_describe(spec)}, clip {clipping.label}"
    info: dict = {}

    def render(results, stopped=None):
        if format is Format.table:
            from .report import run_table, run_verdict

            if not results:
                return
            summary = results[0].summary
            from .sinks import stdout_errors

            with stdout_errors():
                console = _stdout()
                console.print(escape(title + (f" ({stopped})" if stopped else "")), style="italic")
                console.print(run_table(summary))
                console.print(escape(run_verdict(summary)))
        else:
            _emit_rows([row for r in results for row in _tagged(r.clipping, r.rows, info)], CSV_COLUMNS, format)

    results = _train_then_keep([sink], lambda progress: [_train_one(spec, clipping, sink, quiet, progress, info)],
                               show=render, quiet=quiet)
    render(results)
    if plot is not None:
        from .report import Variant, plot as draw

        shown = [Variant(clipping.strategy, clipping.param, results[0].rows, meta=info.get("meta", {}))]
        _write_plot(lambda path, kind: draw(shown, path, f"{title}\n{info.get('setup', '')}", kind), plot)


def _describe(spec) -> str:
    from .session import describe

    return describe(spec)


def _resolved(params: dict):
    from .session import RunSpec, resolve

    names = RunSpec.__dataclass_fields__.keys()
    return resolve(_spec(**{k: params[k] for k in names}))


def _check_paths(spec, outputs: dict) -> None:
    """Every output path against the inputs and each other, before anything is loaded."""
    from .sinks import check_outputs

    model_kind = "model folder" if Path(spec.model).is_dir() else "model file"
    data_kind = "data folder" if Path(spec.data).is_dir() else "data file"
    check_outputs(outputs, {model_kind: spec.model, data_kind: spec.data, "vocabulary": spec.vocab})


def _loading(quiet: bool, spec) -> None:
    """On a terminal, say what is happening before TensorFlow's seconds of start-up (logs and
    pipes get the start line alone, so an error stays the only line)."""
    if not quiet and sys.stderr.isatty():
        _stderr().print(escape(f"gradwatch: loading TensorFlow and {_describe(spec)} ..."))


def _train_one(spec, clipping, sink, quiet, progress, info: dict):
    from .session import prepare

    _loading(quiet, spec)
    trainer = prepare(spec)
    _setup(spec, trainer, info)
    trainer.trace(clipping.impl)
    _warn_skipped(trainer)
    _say(quiet, f"gradwatch: training {_describe(spec)} for {_steps(trainer.total_steps)}, clip {clipping.label}; "
                f"{info['setup']}")
    progress.label = f"clip {clipping.label}"
    write = (lambda rows: sink.write(_tagged(clipping, rows, info))) if sink else None
    return trainer.run(clipping, on_rows=write, on_progress=progress.update)


def _setup(spec, trainer, info: dict) -> None:
    """What the CSVs record about the run (info["meta"]) and the start line's optimizer and
    loss (info["setup"])."""
    from .records import setup_text
    from .session import run_meta

    info["meta"] = {**run_meta(spec), "optimizer": trainer.optimizer_text, "loss_fn": trainer.loss_source}
    info["setup"] = setup_text(info["meta"])
    if trainer.loss_scaling:
        info["setup"] += "; float16 layers: dynamic loss scaling as LossScaleOptimizer"


def _tagged(clipping, rows, info: dict) -> list[dict]:
    """Rows as the CSVs hold them: the variant first, what was trained on what last."""
    from .records import META_COLUMNS

    meta = {c: info.get("meta", {}).get(c, "") for c in META_COLUMNS}
    return [{"clip": clipping.strategy, "param": clipping.param, **row, **meta} for row in rows]


def _steps(n: int) -> str:
    return f"{n} step{'s' * (n != 1)}"


SIGNAL_NAMES = {2: "Ctrl-C", 15: "SIGTERM", 1: "SIGHUP"}


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
    try:
        results = train(progress)
    except Interrupted as stop:
        progress.close()
        if before_commit:
            before_commit(stop.results)
        for s in sinks:
            s.commit()
        kept = sum(len(r.rows) for r in stop.results)
        where = f" in {', '.join(str(s.path) for s in sinks)}" if sinks else ""
        what = SIGNAL_NAMES.get(stop.signum, f"signal {stop.signum}")
        _stderr().print(escape(f"gradwatch: interrupted by {what}; kept {kept} recorded rows of {len(stop.results)} variant(s){where}"))
        show(stop.results, f"interrupted by {what} after {_steps(kept)}")
        raise
    except NonFiniteStop:
        progress.close()
        for s in sinks:
            s.commit()
        raise
    except BaseException:
        progress.close()
        for s in sinks:
            s.discard()
        kept = [str(s.kept) for s in sinks if s.kept]
        if kept:
            _stderr().print(escape(f"gradwatch: the rows recorded before the error are in {', '.join(kept)}"))
        raise
    progress.close()
    if before_commit:
        before_commit(results)
    for s in sinks:
        s.commit()
    return results


@app.command()
def compare(
    model: ModelArg = None,
    data: DataOpt = None,
    sample: SampleOpt = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="Strategies, comma separated: value, norm, avg-norm, global, agc, autoclip, zclip.  [default: global]", show_default=False)] = None,
    thresholds: Annotated[Optional[str], typer.Option("--thresholds", help="Each strategy's parameter, comma separated; 'none' is the unclipped baseline.  [default: none,1,5,10]", show_default=False)] = None,
    variants_: Annotated[Optional[str], typer.Option("--variants", help="Exactly these variants instead of --clip x --thresholds, e.g. none,global:5,agc:0.01,autoclip:10,zclip:2.5 (a strategy alone takes its default).", show_default=False)] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Add the unclipped baseline when --thresholds lacks 'none'.")] = True,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Long CSV: one row per variant and step, with clip and param columns.", show_default=False)] = None,
    summary_csv: Annotated[Optional[Path], typer.Option("--summary-csv", help="The summary table, one row per variant.", show_default=False)] = None,
    plot: PlotOpt = None,
    format: FormatOpt = Format.table,
    endpoint: EndpointOpt = None, output: OutputOpt = None, x_key: XKeyOpt = None, y_key: YKeyOpt = None,
    target: TargetOpt = None, vocab: VocabOpt = None, num_steps: NumStepsOpt = None, loss: LossOpt = None,
    from_logits: FromLogitsOpt = None, batch_size: BatchOpt = None, steps: StepsOpt = None, epochs: EpochsOpt = None,
    shuffle: ShuffleOpt = None, seed: SeedOpt = None, optimizer: OptimizerOpt = None, opt: OptOpt = None, lr: LrOpt = None,
    lr_decay: LrDecayOpt = None, decay_after_epoch: DecayAfterOpt = None, on_nonfinite: OnNonFiniteOpt = None,
    fetch_every: FetchEveryOpt = None, xla: XlaOpt = None, spike_factor: SpikeFactorOpt = None,
    spike_window: SpikeWindowOpt = None, allow_nonfinite_data: AllowNonFiniteOpt = None, quiet: QuietOpt = False,
):
    """Train every strategy x threshold (and the unclipped baseline) from the same start on the same batches."""
    from .clip import parse_variant_list, parse_variants
    from .records import CSV_COLUMNS
    from .sinks import CsvSink
    from .report import COMPARE_COLUMNS

    if variants_ is not None:
        if clip is not None or thresholds is not None:
            raise OptionError("give --variants, or --clip with --thresholds, not both")
        variants = parse_variant_list(variants_)
    else:
        variants = parse_variants(clip or "global", thresholds or "none,1,5,10", baseline)
    spec = _resolved(locals())
    _check_plot(plot)
    _check_paths(spec, {"--csv": csv, "--summary-csv": summary_csv, "--plot": plot})
    sink = CsvSink(csv, CSV_COLUMNS) if csv else None
    try:
        summary_sink = CsvSink(summary_csv, COMPARE_COLUMNS, "--summary-csv") if summary_csv else None
    except BaseException:
        if sink:
            sink.discard()  # nothing recorded yet: leave no empty .partial behind
        raise
    title = f"gradwatch compare: {_describe(spec)}"
    info: dict = {}

    def shown(results):
        from .report import Variant

        return [Variant(r.clipping.strategy, r.clipping.param, r.rows, r.stopped, info.get("meta", {})) for r in results]

    def render(results, stopped=None):
        from .report import compare_verdict, print_compare

        if format is Format.table:
            if not results:
                return
            from .sinks import stdout_errors

            variants_shown = shown(results)
            with stdout_errors():
                console = _stdout()
                print_compare(console, variants_shown, title + (f" ({stopped})" if stopped else ""))
                for line in compare_verdict(variants_shown):
                    console.print(escape(line))
        else:
            _emit_rows([row for r in results for row in _tagged(r.clipping, r.rows, info)], CSV_COLUMNS, format)

    def record(results):
        if summary_sink:
            from .report import summary_rows

            summary_sink.write(summary_rows(shown(results)))

    train = lambda progress: _train_many(spec, variants, sink, quiet, progress, info)  # noqa: E731
    results = _train_then_keep([sink, summary_sink], train, show=render, quiet=quiet, before_commit=record)
    render(results)
    if plot is not None:
        from .report import plot as draw

        _write_plot(lambda path, kind: draw(shown(results), path, f"{title}\n{info.get('setup', '')}", kind), plot)


def _train_many(spec, variants, sink, quiet, progress, info: dict):
    from .session import prepare
    from .training import compare as compare_runs

    _loading(quiet, spec)
    trainer = prepare(spec)
    _setup(spec, trainer, info)
    for clipping in variants:
        trainer.trace(clipping.impl)
    _warn_skipped(trainer)
    labels = ", ".join(v.label for v in variants)
    _say(quiet, f"gradwatch: comparing {len(variants)} variants ({labels}) on {_describe(spec)}, {_steps(trainer.total_steps)} each; "
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

    return compare_runs(trainer, variants, on_rows=write, on_progress=advance, on_stop=stopped)


@app.command()
def report(
    file: Annotated[Path, typer.Argument(help="CSV written by `gradwatch run --csv`, `compare --csv` or `compare --summary-csv`.", show_default=False)],
    plot: PlotOpt = None,
):
    """Re-render the summary and verdict of a saved run or comparison, without training."""
    from .records import META_COLUMNS, describe_meta, is_summary_csv, read_rows, setup_text, split_variants
    from .report import Variant, compare_verdict, plot as draw, print_compare, run_table, run_verdict
    from .sinks import check_outputs, stdout_errors

    _check_plot(plot)
    check_outputs({"--plot": plot}, {"CSV it reads": file})
    if is_summary_csv(file):
        return _report_summary(file, plot)
    rows, unfinished = read_rows(file), file.name.endswith(".partial")
    groups = split_variants(rows)
    variants = [Variant(clip, param, group, meta={c: group[0][c] for c in META_COLUMNS})
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
    with stdout_errors():
        console = _stdout()
        if single:
            console.print(escape(title), style="italic")
            if setup:
                console.print(escape(setup), style="italic")
            console.print(run_table(variants[0].summary))
            console.print(escape(run_verdict(variants[0].summary)))
        else:
            if setup:
                console.print(escape(setup), style="italic")
            print_compare(console, variants, title)
            for line in compare_verdict(variants):
                console.print(escape(line))
    if unfinished:
        _stderr().print(escape(f"gradwatch: {file} holds the rows of a run that did not finish ({len(rows)} rows)"))
    if plot is not None:
        full = f"{title}\n{setup}" if setup else title
        _write_plot(lambda path, kind: draw(variants, path, full, kind), plot)


def _report_summary(file: Path, plot: Path | None) -> None:
    """`report` on the file of `compare --summary-csv`: its table again; the rest needs the steps."""
    from .records import META_COLUMNS, describe_meta, read_summary, setup_text
    from .report import Variant, print_compare
    from .sinks import stdout_errors

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


def _check_plot(plot: Path | None) -> None:
    from .report import PLOT_FORMATS

    if plot is None:
        return
    if plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise OptionError(f"--plot writes {', '.join(PLOT_FORMATS)}; give a file name ending in one of them (got {plot})")
    if not plot.parent.is_dir():
        raise OptionError(f"cannot write {plot}: folder {plot.parent} does not exist; create it first")


def _write_plot(draw, plot: Path) -> None:
    """Draw into a temporary file beside ``plot`` and move it into place; OS errors exit 74."""
    from .errors import OutputError

    kind = plot.suffix.lower().lstrip(".")
    tmp = plot.with_name(f".{plot.name}.partial.{kind}")
    try:
        draw(str(tmp), kind)
        os.replace(tmp, plot)
    except OSError as exc:
        raise OutputError(f"cannot write {plot}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _stderr().print(escape(f"gradwatch: wrote {plot}"))


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
    from .signals import stop_signals_unwind

    with stop_signals_unwind():
        try:
            result = app(args=args, prog_name="gradwatch", standalone_mode=False)
            from .sinks import stdout_errors

            with stdout_errors():
                sys.stdout.flush()
            return result if isinstance(result, int) else 0
        except typer.Exit as exc:
            return exc.exit_code
        except (Interrupted, Signalled) as exc:
            return 128 + exc.signum
        except (typer.Abort, KeyboardInterrupt):
            return 130
        except (BrokenPipe, BrokenPipeError):
            _silence_stdout()
            return 141  # as a Unix tool killed by SIGPIPE
        except GradwatchError as exc:
            if debug:
                raise
            _error(str(exc))
            return exc.exit_code
        except Exception as exc:
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
