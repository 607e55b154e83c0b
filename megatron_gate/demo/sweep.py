"""`megatron-gate sweep`: learning-rate sensitivity (Wortsman et al., 2023) at toy scale.

    megatron-gate sweep                                  # 5 variants x 6 LRs x 2 seeds
    megatron-gate sweep --lrs 1e-3,1e-2,1e-1 --seeds 0 --variants baseline,gated_headwise
    megatron-gate sweep --preset evidence                # docs/evidence.md's regime (BOS on)

Every variant (baseline, qk-layernorm, gated headwise, gated elementwise, gated + qk-layernorm)
is trained at every learning rate and seed with the same data order. Per run: final validation
loss, max attention logit, max |h|, first-token share. Per variant, the LR sensitivity of
Wortsman et al.: the mean over the LR sweep of min(loss(lr), loss at init) minus the best loss
(lower = less sensitive; a diverged run counts as the loss at init).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_gate.demo.cli import (
    DemoInputError,
    add_model_arguments,
    data_source,
    prepare_out,
    train_config,
)
from megatron_gate.demo.cli import validate as validate_config
from megatron_gate.demo.data import DataError, check_corpus_size, load_corpus
from megatron_gate.demo.trainer import VARIANTS, RunPlan, TrainConfig, execute

DEFAULTS = TrainConfig(
    layers=2,
    hidden=64,
    heads=4,
    seq_len=64,
    batch_size=8,
    steps=100,
    eval_interval=100,
    eval_batches=4,
    checkpoint_interval=10**9,
    write_checkpoints=False,
)
DEFAULT_LRS = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_SEEDS = (0, 1)
PRESETS: dict[str, dict[str, object]] = {
    # The base point of docs/evidence.md's regime search (a BOS token at position 0, the demo's
    # model, 100 steps) from a stable LR to one where the baseline diverges (lr 3: validation
    # loss 18 in the search), the paper's four variants, 3 seeds: the regime where the search
    # saw loss spikes and divergence (it saw no persistent sink anywhere; see that page).
    "evidence": {"bos": True, "layers": 4, "hidden": 128, "heads": 4, "seq_len": 128,
             "batch_size": 4, "steps": 100, "lrs": "1e-2,3e-2,0.1,0.3,1,3", "seeds": "0,1,2",
             "variants": "baseline,qk_layernorm,gated_headwise,gated_elementwise"},
}  # fmt: skip


class PresetAction(argparse.Action):
    """`--preset NAME`: the preset's flag values, except for flags given before it with another
    value than their default (flags after it override the preset)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        for key, value in PRESETS[values].items():
            if getattr(namespace, key) == parser.get_default(key):
                setattr(namespace, key, value)
        setattr(namespace, self.dest, values)


@dataclass(frozen=True, kw_only=True)
class SweepRun:
    """One finished (or diverged) run of the sweep, read back from its directory."""

    variant: str
    lr: float
    seed: int
    status: str
    initial_loss: float
    final_loss: float
    """Validation loss at the end (NaN when the run diverged)."""
    max_attention_logit: float
    max_abs_residual: float
    first_token_share: float
    spikes: int


def _finite_max(grid: list[list[float]]) -> float:
    values = [v for row in grid for v in row if math.isfinite(v)]
    return max(values) if values else float("nan")


def read_sweep_run(run_dir: Path) -> SweepRun:
    """Summarise one run directory: max logit and max |h| over the run, final first-token share."""
    from megatron_gate.demo.report import load_run

    run = load_run(run_dir)
    share = [v for v in run.final_layers("first_token_attention_share") if math.isfinite(v)]
    losses = run.scalars.get("loss", [])
    return SweepRun(
        variant=run.name,
        lr=float(run.config.get("lr", math.nan)),
        seed=int(run.config.get("seed", -1)),
        status=run.status,
        initial_loss=losses[0] if losses else math.nan,
        final_loss=run.final_validation_loss() if run.status == "completed" else math.nan,
        max_attention_logit=_finite_max(run.layers.get("max_attention_logit", [])),
        max_abs_residual=_finite_max(run.layers.get("max_abs_residual", [])),
        first_token_share=sum(share) / len(share) if share else math.nan,
        spikes=run.event_count("loss_spike") + run.event_count("grad_norm_spike"),
    )


def lr_sensitivity(losses_by_lr: dict[float, float], init_loss: float) -> float:
    """Wortsman et al.: E_lr[min(loss(lr), init_loss)] - min_lr loss(lr); NaN loss = diverged."""
    capped = [min(v, init_loss) if math.isfinite(v) else init_loss for v in losses_by_lr.values()]
    if not capped:
        return math.nan
    return sum(capped) / len(capped) - min(capped)


@dataclass(frozen=True, kw_only=True)
class VariantSummary:
    """A variant's row of the sensitivity table (losses averaged over seeds at each LR)."""

    variant: str
    lr_sensitivity: float
    best_loss: float
    best_lr: float
    loss_by_lr: dict[float, float]
    diverged: int
    runs: int


def summarise(runs: Sequence[SweepRun]) -> list[VariantSummary]:
    """Per variant: seed-averaged loss per LR (a diverged seed counts as the init loss)."""
    summaries = []
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == variant and r.status != "interrupted"]
        init = sum(r.initial_loss for r in mine) / len(mine)
        loss_by_lr: dict[float, float] = {}
        for lr in sorted({r.lr for r in mine}):
            losses = [
                min(r.final_loss, init) if math.isfinite(r.final_loss) else init
                for r in mine
                if r.lr == lr
            ]
            loss_by_lr[lr] = sum(losses) / len(losses)
        best_lr = min(loss_by_lr, key=loss_by_lr.__getitem__)
        summaries.append(
            VariantSummary(
                variant=variant,
                lr_sensitivity=lr_sensitivity(loss_by_lr, init),
                best_loss=loss_by_lr[best_lr],
                best_lr=best_lr,
                loss_by_lr=loss_by_lr,
                diverged=sum(1 for r in mine if not math.isfinite(r.final_loss)),
                runs=len(mine),
            )
        )
    return summaries


# ---------------------------------------------------------------------- command
def _csv(kind: type, text: str, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise DemoInputError(f"{flag} {text!r}: {error}; pass comma-separated values.") from None
    if not values:
        raise DemoInputError(f"{flag} is empty; pass comma-separated values.")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`megatron-gate sweep` flags."""
    parser.add_argument("--preset", choices=sorted(PRESETS), action=PresetAction, default=None,
                        help="a documented regime (docs/evidence.md); later flags override it")  # fmt: skip
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS),
                        help="comma-separated peak learning rates (default %(default)s)")  # fmt: skip
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="comma-separated seeds (default %(default)s)")  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variants (default: all: %(default)s)")  # fmt: skip
    add_model_arguments(parser, DEFAULTS)
    parser.add_argument("--out", type=Path, default=Path("megatron-gate-sweep"),
                        help="output folder (default %(default)s)")  # fmt: skip


def coarse_to_fine(values: Sequence[float]) -> list[float]:
    """Sorted values reordered ends first, then repeated midpoints: [1, 6, 3, 2, 4, 5] style."""
    ordered = sorted(values)
    result: list[float] = []
    spans = [(0, len(ordered) - 1)]
    while spans:
        low, high = spans.pop(0)
        for index in (low, high):
            if ordered[index] not in result:
                result.append(ordered[index])
        if high - low > 1:
            middle = (low + high) // 2
            result.append(ordered[middle])
            spans += [(low, middle), (middle, high)]
    return result


def complete_groups(runs: Sequence[SweepRun]) -> list[SweepRun]:
    """Runs of the (lr, seed) pairs that every variant finished (an interrupted sweep's tail
    would otherwise compare variants on different learning rates)."""
    variants = {r.variant for r in runs}
    done = {(r.lr, r.seed, r.variant) for r in runs if r.status != "interrupted"}
    return [r for r in runs if all((r.lr, r.seed, v) in done for v in variants)]


MAX_RUNS = 1000
"""Largest sweep accepted (runs are sequential on the CPU)."""


def _check_unique(flag: str, names: list[str]) -> None:
    """Two values that name the same run folder (`1e-2,0.01`) would overwrite each other."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DemoInputError(
            f"{flag} repeats {', '.join(repeated)} ({flag}): every value names one run folder; "
            "list each value once."
        )


def plan_runs(args: argparse.Namespace) -> tuple[list[tuple], list[TrainConfig]]:
    """(variant, config, run dir) for every variant x LR x seed; raises `DemoInputError`."""
    lrs = _csv(float, args.lrs, "--lrs")
    seeds = _csv(int, args.seeds, "--seeds")
    names = _csv(str, args.variants, "--variants")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise DemoInputError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}.")
    _check_unique("--lrs", [f"{lr:g}" for lr in lrs])
    _check_unique("--seeds", [str(seed) for seed in seeds])
    _check_unique("--variants", names)
    total = len(lrs) * len(seeds) * len(names)
    if total > MAX_RUNS:
        raise DemoInputError(
            f"--lrs x --seeds x --variants asks for {total} runs (--lrs): at most {MAX_RUNS}; "
            "sweep fewer values."
        )
    runs, configs = [], []
    # Seed-major, coarse-to-fine LR order: an interrupted sweep still spans the LR range.
    for seed in seeds:
        for lr in coarse_to_fine(lrs):
            config = train_config(args, DEFAULTS, lr=lr, seed=seed)
            configs.append(config)
            for name in names:
                run_dir = args.out / "runs" / name / f"lr{lr:g}_seed{seed}"
                runs.append((VARIANTS[name], config, str(run_dir)))
    return runs, configs


def run(args: argparse.Namespace) -> int:
    """Validate, train every run, write `OUT/sweep.{json,md,html}`; exit 130 on Ctrl-C."""
    try:
        runs, configs = plan_runs(args)
        corpus = load_corpus(data_source(args))
        for config in configs:
            validate_config(config, vocab_size=corpus.vocab_size)
        check_corpus_size(corpus, seq_len=configs[0].seq_len)
        prepare_out(args.out, ["runs"], overwrite=args.overwrite)
    except (DemoInputError, DataError) as error:
        print(f"megatron-gate sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"megatron-gate sweep: {len(runs)} runs on {corpus.name}", file=sys.stderr)
    interrupted = False
    try:
        results = execute(RunPlan(runs=runs, data=data_source(args), progress="line"))
        interrupted = any(r.status == "interrupted" for r in results)
    except KeyboardInterrupt:
        interrupted = True
    finished = [
        read_sweep_run(Path(d)) for _v, _c, d in runs if (Path(d) / "stability.jsonl").exists()
    ]
    write_results(args, finished)
    if interrupted:
        print("Interrupted: the sweep report covers what finished.", file=sys.stderr)
        return 130
    return 0


def write_results(args: argparse.Namespace, runs: Sequence[SweepRun]) -> None:
    """`sweep.json` (every run), `sweep.md` (tables) and `sweep.html` (tables and plot)."""
    from megatron_gate.demo.report import markdown_table, write_sweep_report
    from megatron_gate.output_files import atomic_write_text

    compared = complete_groups(runs)
    summaries = summarise(compared) if compared else []
    sensitivity, per_run = sensitivity_rows(summaries), run_rows(runs)
    command = "megatron-gate sweep " + " ".join(sys.argv[2:])
    payload = {"command": command, "runs": [asdict(r) for r in runs],
               "summaries": [asdict(s) for s in summaries]}  # fmt: skip
    atomic_write_text(args.out / "sweep.json", json.dumps(payload, indent=1, default=str))
    markdown = (
        f"LR sensitivity (lower is better):\n\n{markdown_table(sensitivity)}\n\n"
        f"Runs:\n\n{markdown_table(per_run)}\n"
    )
    atomic_write_text(args.out / "sweep.md", markdown)
    write_sweep_report(runs, summaries, args.out / "sweep.html", sensitivity, per_run,
                       settings=vars(args), figure_path=args.out / "sweep.png")  # fmt: skip
    print("\n" + markdown)
    for name in ("sweep.html", "sweep.png", "sweep.md", "sweep.json", "runs/"):
        print(f"  {args.out / name}")


def sensitivity_rows(summaries: Sequence[VariantSummary]) -> list[dict[str, str]]:
    lrs = sorted({lr for s in summaries for lr in s.loss_by_lr})
    return [
        {
            "variant": s.variant,
            "LR sensitivity": f"{s.lr_sensitivity:.3f}",
            "best loss": f"{s.best_loss:.3f}",
            "best lr": f"{s.best_lr:g}",
            "diverged runs": f"{s.diverged}/{s.runs}",
            **{
                f"loss @ {lr:g}": f"{s.loss_by_lr[lr]:.3f}" if lr in s.loss_by_lr else "-"
                for lr in lrs
            },
        }
        for s in summaries
    ]


def run_rows(runs: Sequence[SweepRun]) -> list[dict[str, str]]:
    def fmt(value: float) -> str:
        return f"{value:.4g}" if math.isfinite(value) else "-"

    order = {name: index for index, name in enumerate(VARIANTS)}
    ordered = sorted(runs, key=lambda r: (order.get(r.variant, len(order)), r.lr, r.seed))
    return [
        {
            "variant": r.variant,
            "lr": f"{r.lr:g}",
            "seed": str(r.seed),
            "status": r.status,
            "final loss": fmt(r.final_loss),
            "max attn logit": fmt(r.max_attention_logit),
            "max abs(h)": fmt(r.max_abs_residual),
            "first-token share": fmt(r.first_token_share),
            "spikes": str(r.spikes),
        }
        for r in ordered
    ]
