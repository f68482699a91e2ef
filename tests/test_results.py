"""dbtr-results on real run folders: a seed sweep (multirun) of the full method and a zero-shot run on the
tiny fixture, plus copies of those runs edited to test refusals, skips and missing values."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dbtr.cli.results import END, START, format_mean_std, main, mean_std, replace_readme_block

TRAIN = ["trainer.max_epochs=1", "model.scheduler.warmup_epochs=0", "model.optimizer.lr=0.01"]
QUIET = ["logger=none", "callbacks=none"]  # no checkpoints or plots: seconds per run


@pytest.fixture(scope="module")
def runs(demo_dir, tmp_path_factory, cli):
    """<root>/multirun/sweep/{0,1} (full method, seeds 1 and 2) and <root>/single/zs (zero-shot CLIP)."""
    root = tmp_path_factory.mktemp("results")
    cli(
        "dbtr-train",
        "-m",
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        *TRAIN,
        "seed=1,2",
        *QUIET,
        f"hydra.sweep.dir={root / 'multirun' / 'sweep'}",
        cwd=root,
    )
    cli(
        "dbtr-train",
        "experiment=tiny_zsclip",
        f"paths.tiny_dir={demo_dir}",
        *QUIET,
        f"hydra.run.dir={root / 'single' / 'zs'}",
        cwd=root,
    )
    return root


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _copy(run: Path, dest: Path, edit=None, hydra: bool = True) -> Path:
    """A copy of a real run folder (metrics.json, and .hydra unless hydra=False), metrics.json edited by
    ``edit``."""
    dest.mkdir(parents=True)
    if hydra:
        shutil.copytree(run / ".hydra", dest / ".hydra")
    payload = _metrics(run)
    if edit:
        edit(payload)
    (dest / "metrics.json").write_text(json.dumps(payload))
    return dest


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _row(markdown: str, method: str) -> list[str]:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {method} |")]
    assert len(rows) == 1, markdown
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_metrics_json_records_choices_and_overrides(runs):
    m = _metrics(runs / "multirun" / "sweep" / "0")
    assert (m["choices"]["model"], m["choices"]["data"], m["choices"]["experiment"]) == (
        "dbtr",
        "tiny",
        "tiny_full",
    )
    assert not any(k.startswith("hydra/") for k in m["choices"])
    assert "seed=1" in m["overrides"] and "model.optimizer.lr=0.01" in m["overrides"]


def test_table_rows_columns_cells_and_made_by(runs, cli):
    proc = cli("dbtr-results", str(runs), "--metric", "test/mAP", "--metric", "test/CF1@3", cwd=runs)
    md = proc.stdout
    header = md.splitlines()[0]
    assert header == "| method | made by | tiny test/mAP | tiny test/CF1@3 |"
    sweep = [_metrics(runs / "multirun" / "sweep" / i) for i in ("0", "1")]
    zs = _metrics(runs / "single" / "zs")
    maps = [m["test"]["test/mAP"] for m in sweep]
    assert maps[0] != maps[1]  # the seeds really differ, so the std below is tested
    full = _row(md, "dbtr")
    assert full[1] == "`experiment=tiny_full model=dbtr " + " ".join(TRAIN) + " callbacks=none`"
    assert full[2] == f"{np.mean(maps):.2f} ± {np.std(maps, ddof=1):.2f} (2)"
    f1 = [m["test"]["test/CF1@3"] for m in sweep]
    assert full[3] == f"{np.mean(f1):.2f} ± {np.std(f1, ddof=1):.2f} (2)"
    zero = _row(md, "zsclip")
    assert zero[1] == "`experiment=tiny_zsclip model=zsclip callbacks=none`"
    assert zero[2] == f"{zs['test']['test/mAP']:.2f} (1)"  # one run: no ±
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 3  # header + 2 rows
    assert "3 runs" in md and "Skipped" not in md


def test_csv_holds_exact_numbers_and_out_writes_both(runs, capsys, tmp_path):
    rc, out, _ = _run(capsys, runs, "--out", tmp_path / "results")
    assert rc == 0
    assert (tmp_path / "results.md").read_text() == out
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    full = next(r for r in rows if r["method"] == "dbtr")
    maps = [_metrics(runs / "multirun" / "sweep" / i)["test"]["test/mAP"] for i in ("0", "1")]
    assert float(full["mean"]) == pytest.approx(np.mean(maps), rel=1e-12)
    assert float(full["std"]) == pytest.approx(np.std(maps, ddof=1), rel=1e-12)
    assert full["n"] == "2" and sorted(full["seeds"].split()) == ["1", "2"] and full["metric"] == "test/mAP"
    assert len(full["runs"].split()) == 2
    rc, out, _ = _run(capsys, runs, "--format", "csv")
    assert rc == 0 and out.startswith("method,made_by,data,column,metric,mean,std,n,seeds,runs\n")


def test_sort_puts_the_best_first(runs, capsys):
    rc, out, _ = _run(capsys, runs, "--sort", "test/mAP")
    assert rc == 0
    table = {r[0]: float(r[2].split()[0]) for r in (_row(out, "dbtr"), _row(out, "zsclip"))}
    best = max(table, key=table.get)
    assert [line for line in out.splitlines() if line.startswith("| ")][1].startswith(f"| {best} |")
    rc, _, err = _run(capsys, runs, "--sort", "test/nothing")
    assert rc == 2 and "no run has that metric" in err


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda m: m.update(class_names=m["class_names"][:-1]),
            ["class_names: 6 classes vs 5 classes", "'orange'"],
        ),
        (
            lambda m: m["config"]["model"]["evaluation"].update(difficult="ignore"),
            ["difficult: 'negative' vs 'ignore'"],
        ),
        (lambda m: m["test"].update({"test/num_images": 10}), ["num_images: 32 vs 10"]),
    ],
    ids=["class_names", "difficult", "num_images"],
)
def test_refuses_a_column_mixing_protocols(runs, capsys, tmp_path, edit, expected):
    other = _copy(runs / "single" / "zs", tmp_path / "other", edit)
    rc, out, err = _run(capsys, runs / "single" / "zs", other)
    assert rc == 2 and out == ""
    assert "refusing" in err and "data=tiny" in err and "--allow-mixed" in err
    assert str(runs / "single" / "zs") in err and str(other) in err
    for text in expected:
        assert text in err
    rc, out, _ = _run(capsys, runs / "single" / "zs", other, "--allow-mixed")
    assert rc == 0
    header = out.splitlines()[0].split(" | ")
    assert len(header) == 4 and all("tiny [" in h for h in header[2:])


def test_broken_and_unfinished_runs_are_listed_as_skipped(runs, capsys, tmp_path):
    broken = _copy(runs / "single" / "zs", tmp_path / "broken")
    (broken / "metrics.json").write_text('{"task_name": "tiny_zsclip", "test": {')  # killed mid-write
    unfinished = tmp_path / "unfinished"
    shutil.copytree(
        runs / "single" / "zs" / ".hydra", unfinished / ".hydra"
    )  # a run that died before metrics.json
    rc, out, err = _run(capsys, runs, tmp_path)
    assert rc == 0
    assert "Skipped 2 run folder(s):" in out and "3 runs" in out
    assert f"`{broken}`: metrics.json unreadable" in out and f"`{unfinished}`: no metrics.json" in out
    assert f"skipped {broken}" in err and f"skipped {unfinished}" in err
    assert _row(out, "zsclip")[2].endswith("(1)")  # the broken copy did not count
    rc, out, err = _run(capsys, tmp_path)
    assert rc == 1 and "no readable run" in err


def test_a_config_changed_behind_the_overrides_is_noted(runs, capsys, tmp_path):
    def edit(m):  # same command line, other learning rate: an experiment file edited between two seeds
        m["config"]["model"]["optimizer"]["lr"] = 0.5
        m["seed"] = m["config"]["seed"] = 3

    _copy(runs / "multirun" / "sweep" / "1", tmp_path / "edited", edit)
    rc, out, _ = _run(capsys, runs / "multirun", tmp_path)
    assert rc == 0 and _row(out, "dbtr")[2].endswith("(3)")
    assert "differ beyond the seed (model.optimizer.lr: 0.01 vs 0.5)" in out
    rc, out, _ = _run(capsys, runs / "multirun")
    assert (
        "differ beyond the seed" not in out
    )  # real seed sweeps differ only in the seed and their own folders


def test_missing_metric_shows_a_dash_and_is_reported(runs, capsys):
    rc, out, err = _run(capsys, runs, "--metric", "test/mAP", "--metric", "zsl/mAP")
    assert rc == 0
    assert _row(out, "zsclip")[3] == "—" and _row(out, "dbtr")[3] == "—"
    assert "Missing values (3):" in out and out.count(": no zsl/mAP") == 3 and err.count("no zsl/mAP") == 3


def test_other_sections_and_hydra_yaml_fallback(runs, capsys, tmp_path):
    def strip(m):  # a run written before metrics.json stored its choices: read .hydra/hydra.yaml instead
        del m["choices"], m["overrides"]

    source = runs / "multirun" / "sweep" / "0"
    old = _copy(source, tmp_path / "old", strip)
    rc, out, _ = _run(capsys, old, "--metric", "val/mAP")
    assert rc == 0
    row = _row(out, "dbtr")
    assert row[1] == "`experiment=tiny_full model=dbtr " + " ".join(TRAIN) + " callbacks=none`"
    assert row[2] == f"{_metrics(source)['val_last_epoch']['val/mAP']:.2f} (1)"
    rc, _, err = _run(capsys, _copy(source, tmp_path / "bare", strip, hydra=False))
    assert rc == 1 and "no config-group choices" in err


def test_eval_runs_take_method_and_seed_from_the_training_run(runs, capsys, tmp_path):
    train = runs / "multirun" / "sweep" / "1"

    def as_eval(m):
        m.update(task_name="eval", kind="eval", checkpoint=str(train / "checkpoints" / "last.ckpt"))
        m.pop("seed")
        m["choices"].update(model="from_checkpoint", experiment=None)
        m["overrides"] = [
            f"ckpt_path={train}/checkpoints/last.ckpt",
            "data=tiny",
            "model.evaluation.difficult=ignore",
        ]
        m["config"]["model"] = {
            "evaluation": {"difficult": "ignore", "top_k": None, "f1_at": None, "val_subset": None}
        }

    ev = _copy(train, tmp_path / "eval", as_eval, hydra=False)
    rc, out, _ = _run(capsys, ev, "--format", "csv")
    row = next(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and row["method"] == "dbtr" and row["seeds"] == "2"
    assert row["made_by"].startswith(
        "dbtr-eval model.evaluation.difficult=ignore on (experiment=tiny_full model=dbtr"
    )
    assert "tiny [difficult='ignore']" in row["column"] or row["column"] == "tiny"


def test_one_checkpoint_evaluated_twice_is_one_eval_row_not_two_seeds(runs, capsys, tmp_path):
    """The training run's own test, and two dbtr-eval runs of its checkpoint: the evals form their own row
    (named after the training run, whose identity the checkpoint stores) and count once; no 'config edited'
    note."""
    train = runs / "multirun" / "sweep" / "1"
    ckpt = tmp_path / "moved" / "best.ckpt"  # the training run folder is not beside the checkpoint

    def as_eval(m):
        source = {
            "task_name": m["task_name"],
            "choices": dict(m["choices"]),
            "overrides": list(m["overrides"]),
            "seed": m["seed"],
        }
        m.update(task_name="eval", kind="eval", checkpoint=str(ckpt), source=source, seed=1)
        m["choices"].update(model="from_checkpoint", experiment=None)
        m["overrides"] = [f"ckpt_path={ckpt}", "data=tiny"]
        m["config"]["model"] = {
            "evaluation": {"difficult": None, "top_k": None, "f1_at": None, "val_subset": None}
        }

    first = _copy(train, tmp_path / "evals" / "a", as_eval, hydra=False)
    second = _copy(train, tmp_path / "evals" / "b", as_eval, hydra=False)
    rc, out, err = _run(capsys, train, tmp_path / "evals")
    assert rc == 0
    dbtr_rows = [line for line in out.splitlines() if line.startswith("| dbtr |")]
    assert len(dbtr_rows) == 2 and all(line.rstrip(" |").endswith("(1)") for line in dbtr_rows), out
    assert any("`dbtr-eval on (experiment=tiny_full model=dbtr" in line for line in dbtr_rows)
    assert f"was evaluated 2 times the same way ({first}, {second}): counted once" in err.replace(
        str(Path.cwd()) + "/", ""
    )
    assert "differ beyond the seed" not in out and "appears in" not in out


def test_readme_block_is_replaced_exactly(runs, capsys, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\n## Results\n\nText before.\n", "\nText after.\n\n## Next\n"
    readme.write_text(f"{before}{START}\nold table\n{END}{after}")
    rc, out, _ = _run(capsys, runs, "--readme", readme)
    assert rc == 0
    assert readme.read_text() == f"{before}{START}\n{out.rstrip()}\n{END}{after}"
    rc, again, _ = _run(capsys, runs, "--readme", readme)  # idempotent
    assert rc == 0 and readme.read_text() == f"{before}{START}\n{again.rstrip()}\n{END}{after}"
    readme.write_text("no markers\n")
    rc, _, err = _run(capsys, runs, "--readme", readme)
    assert rc == 2 and START in err and readme.read_text() == "no markers\n"


def test_inputs_globs_and_errors(runs, capsys):
    rc, out, _ = _run(capsys, f"{runs}/multirun/*/1", runs / "single" / "zs" / "metrics.json")
    assert rc == 0 and "2 runs" in out and _row(out, "dbtr")[2].endswith("(1)")
    rc, _, err = _run(capsys, runs / "nowhere")
    assert rc == 2 and "no such file or folder" in err
    rc, _, err = _run(capsys, f"{runs}/nothing*")
    assert rc == 2 and "matched nothing" in err


def test_mean_std_format():
    values = [88.0, 88.1, 88.3]
    mean, std, n = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1)) and n == 3
    assert format_mean_std(values) == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)"
    assert format_mean_std([88.071]) == "88.07 (1)" and format_mean_std([]) == "—"
    assert format_mean_std([1.0, 2.0], show_n=False) == "1.50 ± 0.71"


def test_the_readme_results_block_is_a_dbtr_results_table():
    # `dbtr-results --readme README.md` must find exactly one marked block, and what sits there is its output
    from dbtr.toyworld.demo import METHODS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split(START)[1].split(END)[0]
    assert replace_readme_block(readme, block.strip()) == readme
    lines = block.strip().splitlines()
    assert lines[0].startswith("| method | made by | toyworld test/mAP |")
    assert "tabulated by `dbtr-results`" in block
    rows = {line.split(" | ")[0].strip("| ") for line in lines[2:] if line.startswith("| ")}
    assert rows == {name for name, _ in METHODS}
