"""Results tables: the ``metrics.json`` of many runs as one markdown table (and a CSV), mean ± std over seeds.

    dbtr-results logs/                                   # every run below logs/ (single runs and multiruns)
    dbtr-results logs/tiny_full/multiruns/2026-11-28_16-05-40 'logs/*/runs/2026-11-2*'
    dbtr-results logs/ --metric test/mAP --metric test/CF1@3 --sort test/mAP --out results  # results.{md,csv}
    dbtr-results logs/ --readme README.md                # replaces the block between the results markers

Rows are methods, columns are dataset x metric, a cell is the mean ± sample std over seeds, with the number of
runs: ``88.07 ± 0.12 (3)``; one run shows no ±.

**Grouping.** A run is identified by its task name, its ``experiment=`` and ``model=`` choices and its
command-line overrides. The seed and overrides that only say where or how things are written (``seed``,
``hydra.*``, ``paths.*``, ``cache_dir``, ``cache_image_features``, ``logger``; more with ``--ignore KEY``) are
left out, so the runs of a seed sweep fall in one cell. ``data=`` picks the column: a row is everything else,
and its "made by" column is the command that reproduces it (``data=a,b`` is appended when the data was chosen
on the command line). The choices come from ``metrics.json["choices"]`` (the
:class:`~dbtr.system.run_record.RunRecord` written by dbtr-train, dbtr-eval and the toy-world demo), else from
the run's ``.hydra/hydra.yaml``. A ``dbtr-eval`` run (``kind: eval``) is its own row, named after the training
run of its checkpoint (whose identity the checkpoint stores; older checkpoints: the run folder that holds it),
with that run's method and seed; the same checkpoint evaluated again the same way counts once (the newest), so
a re-evaluation never reads as a second seed.

**Protocol.** Numbers share a column only if they were measured the same way. What has to agree, per column:
    class_names          the label space, in order (metrics.json)
    num_images           test/num_images: the evaluated image set (missing or skipped images change it)
    difficult            model.evaluation.difficult (for dbtr-eval: its override, else the checkpoint's)
    split                data.split (e.g. test, val2014, Test)
    classes              data.classes when it is a subset keyword (all | seen | unseen); class_split
    include_unlabeled    data.include_unlabeled
    image_list           data.image_list (a frozen list of evaluated images)
    image_size           data.image_size, and data.fast_decode (preprocessing)
Runs that differ in any of these make the command refuse (exit 2) and say which runs differ in what; with
``--allow-mixed`` each protocol gets its own, labelled columns.

Nothing is dropped silently: run folders without a readable ``metrics.json`` are listed as skipped, runs
without a requested metric leave "—" (or a smaller n) and are listed; both lists go under the table and to
stderr.
Exit status: 0 written, 1 no run found, 2 bad arguments or a refused mix.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbtr.utils.errors import EXIT_USER_ERROR, UserError, cli, format_error, traceback_requested
from dbtr.utils.hydra_utils import override_key

# Overrides that change where or how a run is written, never its numbers (prefixes of the override key).
IGNORED_OVERRIDES = (
    "seed",
    "hydra",
    "paths",
    "cache_dir",
    "cache_image_features",
    "logger",
    "quiet",
    "callbacks.eval_plots",
    "callbacks.lr_monitor",
)
# Protocol field -> config paths tried in order (the first that is set wins).
PROTOCOL_FIELDS: dict[str, tuple[str, ...]] = {
    "difficult": ("model.evaluation.difficult", "evaluation.difficult"),  # the second: dbtr-eval before 0.2
    "split": ("data.split",),
    "classes": ("data.classes",),
    "class_split": ("data.class_split",),
    "include_unlabeled": ("data.include_unlabeled",),
    "image_list": ("data.image_list",),
    "image_size": ("data.image_size",),
    "fast_decode": ("data.fast_decode",),
}
CLASS_SUBSETS = ("all", "seen", "unseen")
START, END = "<!-- results:start -->", "<!-- results:end -->"
MISSING = "—"


class ResultsError(UserError):
    """A refusal or bad input: printed as one message, exit status 2."""


class SkippedRun(Exception):
    """A run folder that cannot be tabulated; the message is the reason."""


# ------------------------------------------------------------ aggregation (also used by the toy-world demo)


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def format_mean_std(values: Sequence[float], digits: int = 2, show_n: bool = True) -> str:
    """``88.07 ± 0.12 (3)``; one value: ``88.07 (1)``; no value: "—"."""
    if not values:
        return MISSING
    mean, std, n = mean_std(values)
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + (f" ({n})" if show_n else "")


# ---------------------------------------------------------------- finding and reading runs


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def find_run_dirs(inputs: Iterable[str]) -> list[Path]:
    """Run folders named by ``inputs``: run dirs, parents searched recursively (multirun sweeps included),
    globs, or metrics.json files. A run folder's own subfolders are not searched; hidden folders are
    skipped."""
    found: dict[Path, None] = {}
    for raw in inputs:
        paths = (
            [Path(p) for p in sorted(glob.glob(raw, recursive=True))] if glob.has_magic(raw) else [Path(raw)]
        )
        if not paths or not paths[0].exists():
            why = " (the glob matched nothing)" if glob.has_magic(raw) else ""
            raise ResultsError(f"{raw}: no such file or folder{why}")
        for path in paths:
            if path.is_file():
                if path.name != "metrics.json":
                    raise ResultsError(f"{path}: expected a run folder, a folder of runs or a metrics.json")
                found[path.parent.resolve()] = None
                continue
            for root, dirs, _ in os.walk(path):
                root_path = Path(root)
                if _is_run_dir(root_path):
                    found[root_path.resolve()] = None
                    dirs[:] = []
                else:
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return list(found)


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _ignored(key: str, ignored: Sequence[str]) -> bool:
    return any(key == p or key.startswith((p + ".", p + "/")) for p in ignored)


def _hydra_identity(run_dir: Path) -> tuple[dict | None, list | None]:
    """Choices and overrides from ``.hydra/hydra.yaml`` (runs written before metrics.json stored them)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None, None
    import yaml

    try:
        hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    except (OSError, yaml.YAMLError):
        return None, None
    return _get(hydra, "runtime.choices"), _get(hydra, "overrides.task")


@dataclass
class Run:
    path: Path
    payload: dict  # the RunRecord as a dict
    kind: str  # train | eval
    method: str
    data: str
    seed: Any
    row_key: tuple
    made_by: str
    data_overridden: bool
    protocol: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        """``name`` from the test metrics, else a top-level entry, else any section (val_last_epoch, zsl,
        ...)."""
        for section in (self.payload.get("test"), self.payload):
            if isinstance(section, dict) and isinstance(section.get(name), (int, float)):
                return float(section[name])
        for section in self.payload.values():
            if isinstance(section, dict) and isinstance(section.get(name), (int, float)):
                return float(section[name])
        return None


def read_record(run_dir: Path):
    from dbtr.system.run_record import RunRecord, RunRecordError

    try:
        return RunRecord.read(run_dir)
    except RunRecordError as why:
        raise SkippedRun(str(why)) from None


def _made_by(experiment: str | None, method: str, own: Sequence[str]) -> str:
    return " ".join([f"experiment={experiment}"] * bool(experiment) + [f"model={method}"] + list(own))


def _own(overrides: Sequence[str], ignored: Sequence[str]) -> list[str]:
    return [
        o
        for o in overrides
        if override_key(o) not in ("experiment", "model", "data") and not _ignored(override_key(o), ignored)
    ]


def load_run(run_dir: Path, ignored: Sequence[str] = IGNORED_OVERRIDES) -> Run:
    record = read_record(run_dir)
    payload = record.to_dict()
    choices, overrides = record.choices, record.overrides
    if not choices:
        choices, overrides = _hydra_identity(run_dir)
    if not isinstance(choices, dict) or not choices.get("model") or not isinstance(overrides, list):
        raise SkippedRun("no config-group choices: neither metrics.json['choices'] nor .hydra/hydra.yaml")
    config = record.config
    own = _own(overrides, ignored)
    experiment = choices.get("experiment")
    made_by = _made_by(experiment, choices["model"], own)
    method, seed = choices["model"], record.seed
    row_key: tuple = (record.task_name, experiment, method, tuple(own))
    difficult = next(
        (v for p in PROTOCOL_FIELDS["difficult"] if (v := _get(config, p)) is not None),
        record.evaluation.get("difficult"),
    )
    if record.kind == "eval":  # its own row, named after the training run of the checkpoint
        own = [o for o in own if override_key(o) != "ckpt_path"]
        source = _source(record, ignored)
        if source is not None:
            method, seed, train_made_by, train_key = source
            made_by = f"dbtr-eval {' '.join(own)} on ({train_made_by})".replace("  ", " ")
            row_key = ("eval", train_key, tuple(own))
        else:  # unknown training run: never average different checkpoints as seeds
            made_by = f"dbtr-eval {' '.join(own)} on {record.checkpoint}".replace("  ", " ")
            row_key = ("eval", str(record.checkpoint), tuple(own))
    protocol = {
        name: next((v for p in paths if (v := _get(config, p)) is not None), None)
        for name, paths in PROTOCOL_FIELDS.items()
    }
    protocol["difficult"] = difficult
    if protocol["classes"] not in CLASS_SUBSETS:  # a file or a list: the class names say it exactly
        protocol["classes"] = None
    protocol["num_images"] = record.test.get("test/num_images")
    protocol["class_names"] = tuple(record.class_names)
    return Run(
        path=run_dir,
        payload=payload,
        kind=record.kind,
        method=method,
        data=str(choices.get("data")),
        seed=seed,
        row_key=row_key,
        made_by=made_by,
        data_overridden=any(override_key(o) == "data" for o in overrides),
        protocol=protocol,
    )


def _source(record, ignored: Sequence[str]) -> tuple | None:
    """(method, seed, made by, row key) of the training run of an eval record's checkpoint."""
    src = record.source
    if src and (src.get("choices") or {}).get("model"):
        own = _own(src.get("overrides") or [], ignored)
        experiment, method = src["choices"].get("experiment"), src["choices"]["model"]
        return (
            method,
            src.get("seed"),
            _made_by(experiment, method, own),
            (src.get("task_name"), experiment, method, tuple(own)),
        )
    train = _training_run(record.checkpoint, ignored)
    return None if train is None else (train.method, train.seed, train.made_by, train.row_key)


def _training_run(checkpoint: str | None, ignored: Sequence[str]) -> Run | None:
    if not checkpoint:
        return None
    run_dir = Path(checkpoint).parent.parent  # <run>/checkpoints/<name>.ckpt
    try:
        run = load_run(run_dir, ignored)
    except SkippedRun:
        return None
    return run if run.kind == "train" else None


# ---------------------------------------------------------------- the table


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _describe(field_name: str, value: Any) -> str:
    if field_name == "class_names":
        return f"{len(value)} classes"
    return repr(value)


def _difference(a: Run, b: Run) -> str:
    parts = []
    for name in a.protocol:
        va, vb = a.protocol[name], b.protocol[name]
        if va == vb:
            continue
        text = f"{name}: {_describe(name, va)} vs {_describe(name, vb)}"
        if name == "class_names":
            only_a, only_b = [c for c in va if c not in vb], [c for c in vb if c not in va]
            text += (
                f" (only in the first: {only_a[:10]}; only in the second: {only_b[:10]})"
                if only_a or only_b
                else " (same names, other order)"
            )
        parts.append(text)
    return "; ".join(parts)


def _signature(run: Run) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in run.protocol.items())


@dataclass
class Column:
    data: str
    label: str  # the data name, plus the protocol fields that set it apart when mixed
    signature: tuple


def columns_for(runs: list[Run], allow_mixed: bool) -> dict[tuple, Column]:
    """One column group per data choice; refuses (or, if allowed, splits) a data choice measured two ways."""
    by_data: dict[str, dict[tuple, list[Run]]] = {}
    for run in runs:
        by_data.setdefault(run.data, {}).setdefault(_signature(run), []).append(run)
    columns, problems = {}, []
    for data, groups in by_data.items():
        firsts = [group[0] for group in groups.values()]
        ref = firsts[0]
        if len(groups) > 1 and not allow_mixed:
            problems.append(f"data={data}:")
            problems += [
                f"  {_show(ref.path)} vs {_show(group[0].path)}"
                f"{f' (and {len(group) - 1} more like it)' if len(group) > 1 else ''}: "
                f"{_difference(ref, group[0])}"
                for group in list(groups.values())[1:]
            ]
        varying = [k for k in ref.protocol if any(r.protocol[k] != ref.protocol[k] for r in firsts)]
        for sig, group in groups.items():
            label = data
            if varying:
                label += " [" + ", ".join(f"{k}={_describe(k, group[0].protocol[k])}" for k in varying) + "]"
            columns[(data, sig)] = Column(data, label, sig)
    if problems:
        raise ResultsError(
            "refusing to put runs measured under different protocols in one column:\n"
            + "\n".join(problems)
            + "\nTabulate them separately, or pass --allow-mixed to give each protocol its own labelled "
            "columns."
        )
    return columns


@dataclass
class Table:
    metrics: list[str]
    columns: list[Column]
    rows: list[dict]  # method, made_by, cells {(column index, metric): (values, seeds, runs)}
    skipped: list[tuple[Path, str]]
    missing: list[tuple[Path, str]]
    notes: list[str]
    num_runs: int


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_difference(a: Run, b: Run, ignored: Sequence[str] = IGNORED_OVERRIDES, limit: int = 5) -> str:
    """Resolved-config entries that differ between two runs of one cell, leaving out the ignored keys and
    entries naming the run's own folder (checkpoint and log dirs)."""

    def flat(run: Run) -> dict[str, Any]:
        own = {str(run.path), str(_get(run.payload["config"], "paths.output_dir"))}
        return {
            k: v
            for k, v in _flatten(run.payload["config"]).items()
            if not _ignored(k, ignored) and not (isinstance(v, str) and any(o in v for o in own))
        }

    fa, fb = flat(a), flat(b)
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    text = "; ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def build_table(
    runs: list[Run],
    metrics: Sequence[str],
    allow_mixed: bool = False,
    skipped: Sequence[tuple[Path, str]] = (),
    sort: str | None = None,
    ignored: Sequence[str] = IGNORED_OVERRIDES,
) -> Table:
    runs, notes = _one_per_evaluation(runs)
    columns_by_key = columns_for(runs, allow_mixed)
    columns = list(columns_by_key.values())
    index = {key: i for i, key in enumerate(columns_by_key)}
    rows: dict[tuple, dict] = {}
    missing = []
    for run in runs:
        row = rows.setdefault(
            run.row_key, {"method": run.method, "made_by": run.made_by, "data": [], "cells": {}, "runs": {}}
        )
        if run.data_overridden and run.data not in row["data"]:
            row["data"].append(run.data)
        col = index[(run.data, _signature(run))]
        row["runs"].setdefault(col, []).append(run)
        for metric in metrics:
            cell = row["cells"].setdefault((col, metric), ([], [], []))
            value = run.metric(metric)
            if value is None or math.isnan(value):
                missing.append((run.path, f"no {metric}" if value is None else f"{metric} is NaN"))
                continue
            cell[0].append(value), cell[1].append(run.seed), cell[2].append(run.path)
    for row in rows.values():
        if row["data"]:  # reproducible: the data choices this row was swept over
            row["made_by"] += " data=" + ",".join(row["data"])
        for (col, metric), (_, seeds, paths) in row["cells"].items():
            repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
            if repeated and metric == metrics[0]:
                notes.append(
                    f"{row['method']} ({row['made_by']}) on {columns[col].label}: seed {', '.join(repeated)} "
                    f"appears in {len(paths)} runs; every run is counted"
                )
        for _col, group in row["runs"].items():
            for other in group[1:]:
                if diff := config_difference(group[0], other, ignored):
                    notes.append(
                        f"{_show(group[0].path)} and {_show(other.path)} share a cell but their configs "
                        f"differ beyond the seed ({diff}): was a config file edited between them?"
                    )
    ordered = sorted(rows.values(), key=lambda r: (r["made_by"], r["method"]))
    if sort:
        ordered = _sorted(ordered, columns, sort)
    return Table(list(metrics), columns, ordered, list(skipped), missing, notes, len(runs))


def _one_per_evaluation(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One checkpoint evaluated the same way twice is one measurement, not two seeds: keep the newest."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.kind == "eval" and run.payload.get("checkpoint"):
            key = (run.row_key, run.data, str(Path(run.payload["checkpoint"]).resolve()))
            groups.setdefault(key, []).append(run)
    dropped, notes = set(), []
    for group in groups.values():
        if len(group) > 1:
            group.sort(key=lambda r: (r.path / "metrics.json").stat().st_mtime)
            dropped.update(id(r) for r in group[:-1])
            notes.append(
                f"{group[-1].payload['checkpoint']} was evaluated {len(group)} times the same way "
                f"({', '.join(_show(r.path) for r in group)}): counted once, the newest"
            )
    return [r for r in runs if id(r) not in dropped], notes


def _sorted(rows: list[dict], columns: list[Column], sort: str) -> list[dict]:
    """Descending by ``sort`` (a metric, or ``data:metric``) in the first column that has it; rows without it
    last."""
    data, _, metric = sort.rpartition(":") if ":" in sort else ("", "", sort)
    cols = [i for i, c in enumerate(columns) if not data or c.data == data or c.label == data]
    if not cols:
        raise ResultsError(f"--sort {sort}: no column for data {data!r} (have {[c.label for c in columns]})")

    def key(row):
        for i in cols:
            values = row["cells"].get((i, metric), ([],))[0]
            if values:
                return (0, -statistics.fmean(values))
        return (1, 0.0)

    if not any(key(r)[0] == 0 for r in rows):
        raise ResultsError(f"--sort {sort}: no run has that metric (pass it with --metric too)")
    return sorted(rows, key=key)


def to_markdown(table: Table, digits: int = 2) -> str:
    header = ["method", "made by"] + [f"{c.label} {m}" for c in table.columns for m in table.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = [
            format_mean_std(row["cells"].get((i, m), ([],))[0], digits)
            for i in range(len(table.columns))
            for m in table.metrics
        ]
        lines.append("| " + " | ".join([row["method"], f"`{row['made_by']}`", *cells]) + " |")
    lines += [
        "",
        f"Mean ± sample std over seeds (number of runs), {table.num_runs} runs, tabulated by `dbtr-results`. "
        "A row is reproduced by `dbtr-train -m <made by> seed=<seeds>` (dbtr-eval rows name their command).",
    ]
    if table.skipped:
        lines += ["", f"Skipped {len(table.skipped)} run folder(s):"]
        lines += [f"- `{_show(p)}`: {why}" for p, why in table.skipped]
    if table.missing:
        lines += ["", f"Missing values ({len(table.missing)}):"]
        lines += [f"- `{_show(p)}`: {why}" for p, why in table.missing]
    if table.notes:
        lines += [""] + [f"Note: {n}" for n in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Tidy CSV: one line per (row, column, metric), numbers unrounded."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "made_by", "data", "column", "metric", "mean", "std", "n", "seeds", "runs"])
    for row in table.rows:
        for i, col in enumerate(table.columns):
            for metric in table.metrics:
                values, seeds, paths = row["cells"].get((i, metric), ([], [], []))
                mean, std, n = mean_std(values) if values else ("", "", 0)
                writer.writerow(
                    [
                        row["method"],
                        row["made_by"],
                        col.data,
                        col.label,
                        metric,
                        mean,
                        "" if std is None else std,
                        n,
                        " ".join(map(str, seeds)),
                        " ".join(_show(p) for p in paths),
                    ]
                )
    return out.getvalue()


def replace_readme_block(text: str, block: str, name: str = "README") -> str:
    """``text`` with the part between the results markers replaced by ``block``; refuses unless each marker
    appears exactly once, start before end."""
    starts, ends = text.count(START), text.count(END)
    if starts != 1 or ends != 1 or text.index(START) > text.index(END):
        raise ResultsError(
            f"{name}: needs exactly one {START} followed by one {END} (found {starts} and {ends})"
        )
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block.rstrip()}\n{END}{tail}"


# ---------------------------------------------------------------- command line


def collect(
    inputs: Sequence[str], ignored: Sequence[str] = IGNORED_OVERRIDES
) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run under ``inputs``, and the (folder, reason) of each that cannot be read."""
    runs, skipped = [], []
    for run_dir in find_run_dirs(inputs):
        try:
            runs.append(load_run(run_dir, ignored))
        except SkippedRun as why:
            skipped.append((run_dir, str(why)))
    return runs, skipped


@cli("dbtr-results")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dbtr-results",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 written, 1 no run found, 2 bad arguments or a refused mix.",
    )
    p.add_argument("inputs", nargs="+", help="run folders, folders to search (recursively) or quoted globs")
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric key, repeatable (default test/mAP), e.g. test/CF1@3, val/mAP",
    )
    p.add_argument("--format", choices=("md", "csv", "both"), default="both", help="what --out writes")
    p.add_argument("--out", type=Path, default=None, help="output stem: writes <stem>.md and/or <stem>.csv")
    p.add_argument("--sort", default=None, help="sort rows by this metric (or data:metric), best first")
    p.add_argument("--readme", type=Path, default=None, help="replace the marked results block in this file")
    p.add_argument("--allow-mixed", action="store_true", help="separate columns for different protocols")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="also leave out overrides with this key (prefix) when grouping, e.g. data.root",
    )
    p.add_argument("--digits", type=int, default=2)
    a = p.parse_args(argv)
    metrics = a.metric or ["test/mAP"]
    try:
        ignored = (*IGNORED_OVERRIDES, *a.ignore)
        runs, skipped = collect(a.inputs, ignored)
        for path, why in skipped:
            print(f"dbtr-results: skipped {_show(path)}: {why}", file=sys.stderr)
        if not runs:
            print(
                f"dbtr-results: no readable run under {' '.join(a.inputs)} ({len(skipped)} skipped)",
                file=sys.stderr,
            )
            return 1
        table = build_table(runs, metrics, a.allow_mixed, skipped, a.sort, ignored)
        markdown, table_csv = to_markdown(table, a.digits), to_csv(table)
        readme_text = None
        if a.readme is not None:
            if not a.readme.is_file():
                raise ResultsError(f"--readme {a.readme}: no such file")
            readme_text = replace_readme_block(a.readme.read_text(), markdown, str(a.readme))
    except ResultsError as e:
        if traceback_requested():
            raise
        print(format_error("dbtr-results", str(e)), file=sys.stderr)
        return EXIT_USER_ERROR
    from dbtr.utils.io import atomic_write_text

    for path, why in table.missing:
        print(f"dbtr-results: {_show(path)}: {why}", file=sys.stderr)
    for note in table.notes:
        print(f"dbtr-results: note: {note}", file=sys.stderr)
    written = []
    if a.out is not None:
        stem = a.out.with_suffix("") if a.out.suffix in (".md", ".csv") else a.out
        if a.format in ("md", "both"):
            written.append(atomic_write_text(stem.with_name(stem.name + ".md"), markdown))
        if a.format in ("csv", "both"):
            written.append(atomic_write_text(stem.with_name(stem.name + ".csv"), table_csv))
    if readme_text is not None:
        written.append(atomic_write_text(a.readme, readme_text))
    sys.stdout.write(table_csv if a.format == "csv" else markdown)
    print(
        f"dbtr-results: {len(runs)} runs, {len(table.rows)} rows, {len(skipped)} skipped, "
        f"{len(table.missing)} missing values"
        + (f"; wrote {', '.join(map(str, written))}" if written else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
