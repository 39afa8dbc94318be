"""The main job: the paper's Table 1 ablation on the embedded "deformed fashion" data, offline.

Rows (as in the paper): the regular network with aligned RoI pooling; DCNv1 (deformable conv5 +
deformable RoI pooling); DCNv2 (modulated deformable conv3-conv5 + modulated deformable RoI pooling);
DCNv2 with R-CNN feature mimicking. Each row trains with the preset's config (from the same backbone
weights: pre-trained on the embedded data when the preset sets ``pretrain_iterations``) and is
evaluated with COCO AP; the report folder gets report.md, results.csv, training curves and example
detections.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .metrics_log import read_records

ROWS: list[tuple[str, list[str]]] = [
    ("regular + RoIAlign", ["dcn=null", "roi_pool=align"]),
    ("DCNv1 (conv5) + dpool", ["dcn=v1", "dcn_stages=[5]", "roi_pool=dpool"]),
    ("DCNv2 (conv3-5) + mdpool", ["dcn=v2", "dcn_stages=[3,4,5]", "roi_pool=mdpool"]),
    ("DCNv2 + mdpool + mimicking", ["dcn=v2", "dcn_stages=[3,4,5]", "roi_pool=mdpool", "mimic=true"]),
]
#: Short names of ROWS, in order, for ``run_demo(rows=...)`` / ``deformable demo --rows``.
ROW_KEYS: tuple[str, ...] = ("regular", "dcnv1", "dcnv2", "mimic")
PRESETS = {"smoke": 1, "default": 1, "full": 3}  # preset -> seeds
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class RowResult:
    """One row of the table, over one or more seeds."""

    name: str
    metrics: list[dict[str, float]]
    parameters: int
    train_ms_per_iter: list[float]
    inference_ms: list[float]
    out_dirs: list[Path]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _fmt(values: list[float], scale: float = 100.0) -> str:
    values = [v * scale for v in values if v == v and v >= 0]  # drop NaN and COCO's -1 (no such objects)
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _train_row(cfg, run_dir: Path, resume: bool):
    """``train(cfg, resume=resume)``; a checkpoint that cannot be resumed (written by another version
    or another configuration) is an error that says how to train the rows afresh."""
    from .loop import CHECKPOINT_NAME
    from .trainer import train

    try:
        return train(cfg, resume=resume)
    except ValueError as error:
        if not (resume and (run_dir / CHECKPOINT_NAME).exists()):
            raise
        raise ValueError(
            f"{error}\n`deformable demo --restart` (or another --out) trains the demo's rows afresh"
        ) from error


def run_demo(
    preset: str = "default",
    out: str | Path = "demo_out",
    overrides: list[str] | None = None,
    resume: bool = True,
    seeds: int | None = None,
    rows: Sequence[str] | None = None,
) -> Path:
    """Train and evaluate every row; write and print the report. Returns the report folder.

    ``resume=True`` lets an interrupted demo continue from each row's last checkpoint (a finished
    row is evaluated from its final checkpoint, not retrained). ``seeds`` runs seeds 0..seeds-1 of
    every row (default: the preset's, see :data:`PRESETS`); with more than one the table gives
    mean +- standard deviation. ``rows`` picks a subset of the rows by :data:`ROW_KEYS` (default:
    all), e.g. to finish one row of an earlier report on a later machine; a subset's report is
    written beside the full one, named after its rows (``report_mimic.md``, ``results_mimic.csv``,
    ...), so an earlier full report is kept.
    """

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if seeds is None:
        seeds = PRESETS[preset]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    selected = select_rows(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    start = ""
    for name, row in selected:
        metrics, train_ms, infer_ms, dirs, parameters = [], [], [], [], 0
        for seed in range(seeds):
            run_dir = out / _slug(name) / f"seed{seed}"
            cfg = load_config(
                f"demo_{preset}", [*row, f"seed={seed}", f"out_dir={run_dir}", *(overrides or [])]
            )
            print(f"== {name} (seed {seed}) -> {run_dir}")
            result = _train_row(cfg, run_dir, resume)
            assert result.metrics is not None  # train evaluates at the end by default
            start = start or _describe_start(cfg)
            metrics.append(result.metrics["bbox"])
            train_ms.append(1000 * result.train_seconds / max(result.iterations, 1))
            infer_ms.append(result.metrics["inference_ms_per_image"])
            dirs.append(run_dir)
            parameters = result.parameters
        results.append(RowResult(name, metrics, parameters, train_ms, infer_ms, dirs))
    table = format_table(results)
    print("\n" + table)
    # A subset's report goes beside the full one (report_mimic.md, ...) rather than over it.
    keys = [key for key, row in zip(ROW_KEYS, ROWS, strict=True) if row in selected]
    suffix = "" if len(keys) == len(ROWS) else "_" + "-".join(keys)
    _write_report(out, preset, results, table, start, suffix)
    return out


def select_rows(rows: Sequence[str] | None) -> list[tuple[str, list[str]]]:
    """The entries of :data:`ROWS` named by ``rows`` (keys of :data:`ROW_KEYS`), in table order; all
    of them for None."""
    if rows is None:
        return list(ROWS)
    if isinstance(rows, str) or not all(isinstance(r, str) for r in rows):
        raise TypeError(f"rows must be a sequence of row names, got {rows!r}")
    unknown = sorted(set(rows) - set(ROW_KEYS))
    if unknown or not rows:
        raise ValueError(f"rows must be a non-empty selection of {', '.join(ROW_KEYS)}; got {list(rows)!r}")
    return [row for key, row in zip(ROW_KEYS, ROWS, strict=True) if key in rows]


def _describe_start(cfg) -> str:
    """How the rows' backbones were initialised, for the report."""
    if not cfg.weights_backbone:
        return f"a {cfg.backbone} trained from scratch"
    report = _pretraining_report(cfg.weights_backbone) if cfg.pretrain_iterations else None
    if report is not None:
        return (
            f"a {cfg.backbone} pre-trained for {report['iterations']} iterations on the deformed-fashion "
            f"classification images (top-1 accuracy {100 * report['top1_accuracy']:.1f}% on held-out "
            "garments), the same weights for every row"
        )
    return f"a {cfg.backbone} initialised from {cfg.weights_backbone}"


def _pretraining_report(weights: str) -> dict | None:
    """The pre-training report beside a cached backbone, or None when it is missing or unreadable."""
    try:
        report = json.loads(Path(weights).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and {"iterations", "top1_accuracy"} <= report.keys() else None


def format_table(results: list[RowResult]) -> str:
    """The paper's table layout: box AP, AP50, AP75, APs/m/l, parameters, train and inference time."""
    lines = [
        "| method | AP | AP50 | AP75 | APs | APm | APl | params (M) | train ms/iter | inference ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [_fmt([m[k] for m in r.metrics]) for k in METRICS]
        lines.append(
            f"| {r.name} | {' | '.join(cells)} | {r.parameters / 1e6:.1f} "
            f"| {_fmt(r.train_ms_per_iter, 1.0)} | {_fmt(r.inference_ms, 1.0)} |"
        )
    return "\n".join(lines)


def _write_report(
    out: Path, preset: str, results: list[RowResult], table: str, start: str = "", suffix: str = ""
) -> None:
    """report{suffix}.md, results{suffix}.csv/.json and the figures in ``out``."""
    with (out / f"results{suffix}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["method", "seed", *METRICS, "parameters", "train_ms_per_iter", "inference_ms_per_image"]
        )
        for r in results:
            for seed, m in enumerate(r.metrics):
                writer.writerow(
                    [
                        r.name,
                        seed,
                        *(m[k] for k in METRICS),
                        r.parameters,
                        r.train_ms_per_iter[seed],
                        r.inference_ms[seed],
                    ]
                )
    curves = _plot_curves(out, results, suffix)
    examples = _plot_examples(out, results, suffix)
    lines = [
        f"# deformable demo ({preset} preset)",
        "",
        "Faster R-CNN (FPN) trained on the embedded deformed-fashion data, evaluated with COCO AP on its",
        f"validation split. Rows as in the paper's Table 1. Backbone: {start or 'see config.yaml'}.",
        "",
        table,
        "",
        f"![training curves]({curves.name})" if curves else "",
        f"![example detections]({examples.name})" if examples else "",
    ]
    (out / f"report{suffix}.md").write_text("\n".join(lines) + "\n")
    (out / f"results{suffix}.json").write_text(
        json.dumps(
            [{"method": r.name, "metrics": r.metrics, "parameters": r.parameters} for r in results], indent=2
        )
    )


def _read_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """The run's training losses by iteration (the last record of an iteration logged twice wins)."""
    latest = {r["iteration"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}
    its = sorted(latest)
    return its, [latest[i] for i in its]


def _plot_curves(out: Path, results: list[RowResult], suffix: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r.name, *_read_losses(r.out_dirs[0])) for r in results]
    curves = [(name, its, losses) for name, its, losses in curves if its]
    if not curves:  # no row logged a loss: no figure rather than an empty one
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, its, losses in curves:
        ax.plot(its, losses, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / f"training_curves{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_examples(
    out: Path,
    results: list[RowResult],
    suffix: str = "",
    images: int = 3,
    score_threshold: float = 0.05,
    max_boxes: int = 4,
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .config import config_from_dict
    from .loop import read_model_file
    from .trainer import FINAL_NAME, build_val_dataset, load_trained_model, training_categories

    first = results[0].out_dirs[0] / FINAL_NAME
    if not first.exists():
        return None
    first_data = read_model_file(first)
    cfg = config_from_dict(first_data["config"])
    val = build_val_dataset(cfg, *(training_categories(cfg, first_data.get("categories")) or ()))
    fig, axes = plt.subplots(len(results), images, figsize=(3 * images, 3 * len(results)), squeeze=False)
    for row, r in enumerate(results):
        model = load_trained_model(first_data if row == 0 else r.out_dirs[0] / FINAL_NAME).eval()
        for col in range(images):
            image, _ = val[col]
            with torch.no_grad():
                det = model([image])[0]
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            # The most confident detections (short CPU trainings rarely reach high scores).
            keep = (det["scores"] > score_threshold).nonzero().flatten()[:max_boxes]
            boxes, labels, scores = (
                det["boxes"][keep].tolist(),
                det["labels"][keep].tolist(),
                det["scores"][keep],
            )
            for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores.tolist(), strict=True):
                rectangle = plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", linewidth=1.2)
                ax.add_patch(rectangle)
                ax.text(
                    x1, y1, f"{val.class_names[label]} {score:.2f}", color="yellow", fontsize=6, va="bottom"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(r.name, fontsize=7)
    path = out / f"example_detections{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
