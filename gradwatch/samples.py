"""The built-in samples: a registry of models + data that gradwatch builds on first use.

Builders live in ``sample_runs/`` (installed as ``gradwatch/sample_runs``). A sample is built
deterministically into the cache folder (``$GRADWATCH_CACHE``, else ``$XDG_CACHE_HOME/gradwatch``,
else ``~/.cache/gradwatch``) under a key made of its builder's source, its data files and its
arguments, so it is built once and rebuilt when the builder changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GradwatchError, OptionError

DEFAULT = "ptb-small"


@dataclass(frozen=True)
class Sample:
    name: str
    summary: str  # one line: what it shows
    command: str  # the command to try
    builder: str  # module in sample_runs/
    args: dict = field(default_factory=dict)  # passed to the builder's build()
    defaults: dict = field(default_factory=dict)  # gradwatch options for this sample


def _ptb(config: str, steps: int, summary: str, command: str) -> Sample:
    from_builder = _builder_defaults("ptb_lstm", config)
    return Sample(f"ptb-{config}", summary, command, "ptb_lstm", {"config": config}, {**from_builder, "steps": steps})


def _builder_defaults(module: str, config: str) -> dict:
    return load_builder(module).run_defaults(config)


def registry() -> dict[str, Sample]:
    samples = [
        _ptb(
            "small", 150,
            "PTB-small word LSTM (Zaremba et al.) on Tiny Shakespeare, SGD lr 1: explodes unclipped, calm at global norm 5",
            "gradwatch compare --clip global --thresholds none,5",
        ),
        _ptb(
            "medium", 200,
            "PTB-medium word LSTM (650 units, dropout 0.5): the same jump at a larger size (slow on a CPU)",
            "gradwatch compare --sample ptb-medium --clip global --thresholds none,5 --steps 100",
        ),
        _ptb(
            "large", 100,
            "PTB-large word LSTM (1500 units, dropout 0.65): the tutorial clips it at 10 (needs a GPU to be quick)",
            "gradwatch run --sample ptb-large --clip global --norm 10 --steps 50",
        ),
        _ptb(
            "test", 200,
            "PTB 'test' config (1 layer, 2 units): a seconds-long smoke test of the whole pipeline",
            "gradwatch run --sample ptb-test --clip global --norm 1",
        ),
    ]
    samples += _extra_samples()
    return {s.name: s for s in samples}


def _extra_samples() -> list[Sample]:
    return [
        Sample(
            "rnn-adding",
            "Vanilla tanh RNN on the adding problem (Pascanu et al. 2013): gradient bursts over 60 steps make the loss spike",
            "gradwatch compare --sample rnn-adding --clip global --thresholds none,1",
            "rnn_adding",
            {},
            {**load_builder("rnn_adding").run_defaults("default"), "steps": 200},
        ),
        Sample(
            "deep-mlp",
            "12-layer tanh MLP on a made-up table, SGD at lr 0.2: diverges to NaN unclipped, trains when clipped",
            "gradwatch compare --sample deep-mlp --clip global,norm --thresholds none,1,5",
            "deep_mlp",
            {},
            {**load_builder("deep_mlp").run_defaults("default"), "steps": 300},
        ),
    ]


def get(name: str) -> Sample:
    table = registry()
    if name not in table:
        raise OptionError(f"unknown sample {name!r}; `gradwatch samples` lists them ({', '.join(table)})")
    return table[name]


# --- where builders live, and the cache ------------------------------------------------------


def sample_root() -> Path:
    """``sample_runs/``: inside the installed package, or beside it in a source checkout."""
    installed = Path(__file__).resolve().parent / "sample_runs"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "sample_runs"


def load_builder(module: str):
    qualified = f"gradwatch_sample_runs.{module}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    path = sample_root() / f"{module}.py"
    if not path.is_file():
        raise GradwatchError(f"sample builder {path} is missing; reinstall gradwatch (pip install .)")
    spec = importlib.util.spec_from_file_location(qualified, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = mod
    spec.loader.exec_module(mod)
    return mod


def cache_dir() -> Path:
    if os.environ.get("GRADWATCH_CACHE"):
        return Path(os.environ["GRADWATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradwatch"


def cache_key(sample: Sample) -> str:
    root = sample_root()
    digest = hashlib.sha256()
    digest.update((root / f"{sample.builder}.py").read_bytes())
    for data_file in sorted((root / "data").glob("*")):
        digest.update(data_file.name.encode())
        digest.update(data_file.read_bytes())
    digest.update(json.dumps(sample.args, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def materialize(sample: Sample) -> tuple[Path, Path]:
    """Paths of the sample's model and data, building them into the cache if needed."""
    target = cache_dir() / f"{sample.name}-{cache_key(sample)}"
    manifest = target / "manifest.json"
    if not manifest.is_file():
        _build(sample, target)
    paths = json.loads(manifest.read_text())
    return target / paths["model"], target / paths["data"]


def _build(sample: Sample, target: Path) -> None:
    from .tf_import import tensorflow

    tensorflow()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GradwatchError(f"cannot create the sample cache {target.parent} ({exc.strerror}); set GRADWATCH_CACHE to a writable folder") from None
    tmp = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        paths = load_builder(sample.builder).build(tmp, **sample.args)
        (tmp / "manifest.json").write_text(json.dumps(paths))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
