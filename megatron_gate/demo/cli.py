"""`megatron-gate demo`: baseline vs gated GPT under an aggressive learning rate, monitor on.

    megatron-gate demo                          # embedded corpus, CPU, ~3-5 minutes
    megatron-gate demo --lr 3e-2 --steps 600 --data my_text_document --out runs/demo
    megatron-gate demo --preset sink            # Bigram-Backcopy: an attention sink forms

Trains the same small Megatron-Core GPT twice (same seed, same batches, same learning rate):
without a gate and with the gated attention of Qiu et al. (2025). Ends with a summary table and
`OUT/report.html`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from megatron_gate.demo.data import (
    BYTE_VOCAB_SIZE,
    TASKS,
    DataError,
    DataSource,
    check_corpus_size,
    load_corpus,
)
from megatron_gate.demo.trainer import (
    POSITION_EMBEDDINGS,
    VARIANTS,
    RunPlan,
    TrainConfig,
    Variant,
    demo_monitor_config,
    execute,
)
from megatron_gate.errors import InputError
from megatron_gate.monitor import MonitorConfigError
from megatron_gate.monitor.actions import ABORT_EXIT_CODE

DEFAULTS = TrainConfig(
    layers=4,
    hidden=128,
    heads=4,
    seq_len=128,
    batch_size=8,
    steps=700,
    lr=1e-1,
    eval_interval=50,
    checkpoint_interval=100,
)


PRESETS: dict[str, dict[str, object]] = {
    # Bigram-Backcopy (Guo et al. 2024): a 1-head model whose last layer parks non-trigger
    # queries on BOS. Measured (docs/evidence.md): baseline share 0.91 at step 200, 0.997 at 300.
    "sink": {"task": "bigram-backcopy", "layers": 2, "hidden": 64, "heads": 1, "seq_len": 64,
             "batch_size": 16, "steps": 1200, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0,
             "position_embedding": "learned_absolute",
             "monitor_set": ["probe_queries=63", "log_interval=25", "layer_interval=25"]},
}  # fmt: skip
"""`megatron-gate demo --preset NAME`: documented settings (later flags override them)."""


class PresetAction(argparse.Action):
    """`--preset NAME`: the preset's flag values, except for flags given before it with another
    value than their default (flags after it override the preset)."""

    def __init__(self, *args: object, presets: dict[str, dict[str, object]], **kwargs: object):
        super().__init__(*args, **kwargs)
        self.presets = presets

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        for key, value in self.presets[values].items():
            if getattr(namespace, key) == parser.get_default(key):
                setattr(namespace, key, list(value) if isinstance(value, list) else value)
        setattr(namespace, self.dest, values)


MAX_LR = 100.0
"""Peak learning rates above this train nothing (every run diverges at once)."""
UPPER_BOUNDS = {
    "--steps": 1_000_000,
    "--layers": 64,
    "--hidden": 8192,
    "--heads": 256,
    "--seq-len": 16384,
    "--batch-size": 4096,
    "--tp": 16,
}
"""Largest accepted flag values: memory and run time grow with them (one CPU process per rank)."""


class DemoInputError(InputError):
    """A flag value the demo cannot run with (the message names the flag and the fix)."""


def add_model_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Flags shared by `demo` and `sweep`: model size, data, parallelism."""
    add = parser.add_argument
    add("--steps", type=int, default=defaults.steps, help="training steps (default %(default)d)")
    add(
        "--layers",
        type=int,
        default=defaults.layers,
        help="transformer layers (default %(default)d)",
    )
    add("--hidden", type=int, default=defaults.hidden, help="hidden size (default %(default)d)")
    add("--heads", type=int, default=defaults.heads, help="attention heads (default %(default)d)")
    add(
        "--seq-len",
        type=int,
        default=defaults.seq_len,
        help="sequence length in tokens (default %(default)d)",
    )
    add(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="sequences per step (default %(default)d)",
    )
    add("--tp", type=int, default=1, help="tensor-parallel size (CPU: one gloo process per rank)")
    add("--data", default=None, metavar="PATH",
        help="text file, folder of text files, or Megatron indexed dataset prefix (.bin/.idx); "
        "default: the embedded corpus (this Python's standard library)")  # fmt: skip
    add("--bos", action="store_true",
        help="start every document and every sequence with a BOS token (docs/evidence.md)")  # fmt: skip
    add("--doc-split", default="file", metavar="MODE",
        help="documents of text data: file (one per file / stdlib module), blank-line, or "
        "marker:TEXT (default %(default)s; they are marked in the stream with --bos)")  # fmt: skip
    add("--task", choices=TASKS, default=None,
        help="train on a synthetic task instead of text: bigram-backcopy (Guo et al. 2024; "
        "BOS at position 0, attention sinks form on it; docs/evidence.md)")  # fmt: skip
    add("--position-embedding", choices=POSITION_EMBEDDINGS, default=defaults.position_embedding,
        help="position embedding (default %(default)s)")  # fmt: skip
    add("--weight-decay", type=float, default=defaults.weight_decay,
        help="AdamW weight decay of matrices (default %(default)g)")  # fmt: skip
    add("--overwrite", action="store_true", help="replace earlier runs in --out")


def data_source(args: argparse.Namespace) -> DataSource:
    """The `DataSource` of `--data`, `--bos`, `--doc-split` and `--task`."""
    return DataSource(path=args.data, bos=args.bos, doc_split=args.doc_split, task=args.task)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`megatron-gate demo` flags."""
    parser.add_argument("--preset", choices=sorted(PRESETS), action=PresetAction, default=None,
                        presets=PRESETS,
                        help="documented settings: sink = Bigram-Backcopy, where an attention "
                        "sink forms (docs/demo.md); later flags override them")  # fmt: skip
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr,
                        help="peak learning rate (default %(default)g)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seed of the weights and the batches (default %(default)d)")  # fmt: skip
    add_model_arguments(parser, DEFAULTS)
    parser.add_argument("--granularity", choices=("headwise", "elementwise"), default="headwise",
                        help="gate granularity of the gated run (default %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("megatron-gate-demo"),
                        help="output folder (default %(default)s)")  # fmt: skip
    parser.add_argument("--checkpoint-interval", type=int, default=DEFAULTS.checkpoint_interval,
                        help="steps between checkpoints (and one at the end; default %(default)d)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--monitor-config", default=None, metavar="YAML",
                        help="stability monitor config (docs/monitor.md) instead of the demo's")  # fmt: skip
    parser.add_argument("--monitor-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one monitor key, e.g. detectors.loss_spike.action=lr_backoff "
                        "(repeatable)")  # fmt: skip
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="also write the report's figures as PNG files here")  # fmt: skip


def train_config(
    args: argparse.Namespace, defaults: TrainConfig, *, lr: float, seed: int
) -> TrainConfig:
    """The `TrainConfig` of the parsed flags (intervals scaled to short runs)."""
    return TrainConfig(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=lr,
        seed=seed,
        weight_decay=args.weight_decay,
        position_embedding=args.position_embedding,
        tp=args.tp,
        log_interval=max(1, min(defaults.log_interval, args.steps // 10)),
        eval_interval=max(1, min(defaults.eval_interval, args.steps // 4)),
        checkpoint_interval=getattr(args, "checkpoint_interval", defaults.checkpoint_interval),
        write_checkpoints=defaults.write_checkpoints,
    )


def validate(config: TrainConfig, *, vocab_size: int = BYTE_VOCAB_SIZE) -> None:
    """Raise `DemoInputError` for flags that cannot train, before anything starts."""
    import torch

    if not (math.isfinite(config.lr) and config.lr > 0):
        raise DemoInputError(
            f"--lr {config.lr}: the learning rate must be > 0 and finite (e.g. --lr 1e-2)."
        )
    if config.lr > MAX_LR:
        raise DemoInputError(
            f"--lr {config.lr:g}: above {MAX_LR:g} every run diverges at its first step (--lr): "
            "pass a smaller learning rate."
        )
    for flag, value in (("--steps", config.steps), ("--layers", config.layers),
                        ("--hidden", config.hidden), ("--heads", config.heads),
                        ("--seq-len", config.seq_len), ("--batch-size", config.batch_size),
                        ("--tp", config.tp),
                        ("--checkpoint-interval", config.checkpoint_interval)):  # fmt: skip
        if value < 1:
            raise DemoInputError(f"{flag} {value}: must be a positive integer.")
        if value > UPPER_BOUNDS.get(flag, value):
            raise DemoInputError(
                f"{flag} {value}: at most {UPPER_BOUNDS[flag]} ({flag}): the demo trains on the "
                "CPU and memory grows with it; use Megatron-LM (megatron_gate.run) for larger runs."
            )
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay < 1):
        raise DemoInputError(
            f"--weight-decay {config.weight_decay:g}: must be in [0, 1) (--weight-decay): "
            "AdamW shrinks every weight by lr x this per step."
        )
    if not 0 <= config.seed < 2**63:
        raise DemoInputError(f"--seed {config.seed}: must be in [0, 2**63) (--seed).")
    if config.hidden % config.heads:
        raise DemoInputError(
            f"--hidden {config.hidden} is not divisible by --heads {config.heads}; "
            "pick a hidden size that is a multiple of the head count."
        )
    for what, value in (("--heads", config.heads), ("--hidden", config.hidden),
                        ("the vocabulary size", vocab_size)):  # fmt: skip
        if value % config.tp:
            raise DemoInputError(
                f"{what} = {value} is not divisible by --tp {config.tp}; tensor parallelism "
                "splits heads, hidden and vocabulary evenly: choose a --tp that divides them."
            )
    if torch.cuda.is_available() and config.tp > torch.cuda.device_count():
        raise DemoInputError(
            f"--tp {config.tp} needs {config.tp} GPUs; {torch.cuda.device_count()} are visible."
        )


def prepare_out(out: Path, run_names: list[str], *, overwrite: bool) -> None:
    """Create `out`; refuse a file, and earlier runs unless `overwrite` (then remove them)."""
    check_folder("--out", out)
    for name in run_names:
        run_dir = out / name
        if run_dir.exists() and any(run_dir.iterdir()):
            if not overwrite:
                raise DemoInputError(
                    f"--out {out} already holds a run in {run_dir}; pass another --out or "
                    "--overwrite to replace it."
                )
            shutil.rmtree(run_dir)
    out.mkdir(parents=True, exist_ok=True)


def check_folder(flag: str, folder: Path) -> None:
    """Raise unless `folder` is, or can be created as, a writable folder (nothing is created)."""
    if folder.exists() and not folder.is_dir():
        raise DemoInputError(
            f"{flag} {folder} is a file; pass a folder path (it is created if missing)."
        )
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise DemoInputError(f"{flag} {folder}: {existing} is not a folder ({flag}).")
    probe = existing / f".megatron-gate-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise DemoInputError(
            f"{flag} {folder} is not writable ({existing}: {error.strerror or error}): choose "
            "a writable folder."
        ) from None


def demo_variants(granularity: str) -> list[Variant]:
    return [VARIANTS["baseline"], VARIANTS[f"gated_{granularity}"]]


def print_paths(out: Path, run_dirs: list[Path], report: Path) -> None:
    print("\nWritten:")
    for run_dir in run_dirs:
        print(f"  {run_dir}/stability.jsonl   (monitor JSONL)")
        print(f"  {run_dir}/tensorboard/      (tensorboard --logdir {out})")
        print(f"  {run_dir}/checkpoint/       (latest.json -> last complete step_NNNNNN/)")
    print(f"  {report}   (open in a browser; self-contained)")


def finish(
    out: Path,
    run_dirs: list[Path],
    *,
    title: str,
    settings: dict,
    figures_dir: Path | None = None,
) -> Path:
    """Summary table on stdout and `OUT/report.html` from what is on disk."""
    from megatron_gate.demo.report import (
        has_sink_metrics,
        load_run,
        markdown_table,
        sink_rows,
        summary_rows,
        write_demo_report,
    )

    runs = [load_run(d) for d in run_dirs if (d / "stability.jsonl").exists()]
    print("\n" + markdown_table(summary_rows(runs)))
    if has_sink_metrics(runs):
        print(
            "\nAttention sink (last layer, last logged step):\n" + markdown_table(sink_rows(runs))
        )
    report = out / "report.html"
    write_demo_report(runs, report, title=title, settings=settings, figures_dir=figures_dir)
    print_paths(out, [run.run_dir for run in runs], report)
    return report


def run(args: argparse.Namespace) -> int:
    """Validate, train baseline then gated, write the report; exit code 130 on Ctrl-C, 3 when
    the monitor aborts."""
    try:
        config = train_config(args, DEFAULTS, lr=args.lr, seed=args.seed)
        validate(config)
        if args.figures_dir is not None:
            check_folder("--figures-dir", args.figures_dir)
        corpus = load_corpus(data_source(args))
        validate(config, vocab_size=corpus.vocab_size)
        check_corpus_size(corpus, seq_len=config.seq_len)
        variants = demo_variants(args.granularity)
        monitor = demo_monitor_config(
            layer_interval=config.log_interval,
            overrides=args.monitor_set,
            yaml_path=args.monitor_config,
        )
        prepare_out(args.out, [v.name for v in variants], overwrite=args.overwrite)
    except (DemoInputError, DataError, MonitorConfigError) as error:
        print(f"megatron-gate demo: error: {error}", file=sys.stderr)
        return 2
    run_dirs = [args.out / v.name for v in variants]
    plan = RunPlan(
        runs=[(v, config, str(d)) for v, d in zip(variants, run_dirs, strict=True)],
        data=data_source(args),
        monitor_config=monitor,
        progress="off" if args.quiet else "bar",
    )
    print(
        f"megatron-gate demo: {corpus.description}; {config.layers} layers, "
        f"hidden {config.hidden}, {config.heads} heads, seq {config.seq_len}, batch "
        f"{config.batch_size}, {config.steps} steps at lr {config.lr:g}, tp {config.tp}",
        file=sys.stderr,
    )
    interrupted, aborted = False, False
    try:
        results = execute(plan)
        interrupted = any(r.status == "interrupted" for r in results)
        aborted = any(r.abort_reason is not None for r in results)
    except KeyboardInterrupt:
        interrupted = True
    settings = {**vars(args), "data": corpus.name, "warmup_steps": config.warmup}
    title = f"megatron-gate demo: baseline vs gated ({args.granularity}) at lr {config.lr:g}"
    finish(args.out, run_dirs, title=title, settings=settings, figures_dir=args.figures_dir)
    if interrupted:
        print("Interrupted: the report covers what finished.", file=sys.stderr)
        return 130
    if aborted:
        print("Aborted by the stability monitor (its checkpoint is saved); later runs did not "
              "start.", file=sys.stderr)  # fmt: skip
        return ABORT_EXIT_CODE
    return 0
