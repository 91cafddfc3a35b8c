"""benchmark.py's machinery on the CPU (`--smoke`: tiny models, no budgets): the rows it writes and its report."""
import json

import pytest

import benchmark
import lightweight_small

ROW_KEYS = {"script", "techniques", "ablation", "budget_gib", "micro_batch", "seq_len", "tokens_per_second", "mfu",
            "peak_memory_gib", "train_seconds", "eval_loss", "oom"}


def test_smoke_run_writes_the_issue_schema_and_merges(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the child processes' default cache
    out = tmp_path / "part.json"
    benchmark.main(["--smoke", "--only", "main", "--runs", "before_small,lightweight_big,reference_qlora",
                    "--out", str(out), "--workdir", str(tmp_path / "runs")])
    result = json.loads(out.read_text())
    assert {"gpu", "date", "versions"} <= result.keys() and result["versions"]["torch"]
    rows = {r["name"]: r for r in result["runs"]}
    assert set(rows) == {"before_small", "lightweight_big", "reference_qlora"}
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert row["error"] is None and row["oom"] is False
        assert row["tokens_per_second"] > 0 and row["eval_loss"] > 0 and row["curves"]["train"]
    assert "kbit_prep" in rows["reference_qlora"]["techniques"]

    # merging a second part replaces rows by name and keeps the others; the report writes table and plots
    monkeypatch.setattr(benchmark, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    second = tmp_path / "second.json"
    second.write_text(json.dumps({**result, "runs": [dict(rows["before_small"], tokens_per_second=1.0)]}))
    merged = benchmark.merge([out, second], tmp_path / "results" / "benchmark.json")
    assert sorted(r["name"] for r in merged["runs"]) == sorted(rows)
    assert next(r for r in merged["runs"] if r["name"] == "before_small")["tokens_per_second"] == 1.0
    benchmark.report(merged)
    table = (tmp_path / "results" / "benchmark.md").read_text()
    assert "| reference_qlora |" in table
    assert {p.name for p in (tmp_path / "results").glob("*.png")} == {
        "loss_small.png", "loss_big.png", "speed_memory.png", "ablation.png", "loss_time.png"}


def fake_run_one(spec, workdir, smoke=False):
    """A row without running anything: these tests are about where rows go (run_one is tested above)."""
    return {"name": spec["name"], "script": spec["script"], "error": None}


def test_smoke_run_without_out_leaves_the_committed_results_alone(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    committed = results / "benchmark.json"
    committed.write_bytes((benchmark.RESULTS / "benchmark.json").read_bytes())  # a copy of the real one
    monkeypatch.setattr(benchmark, "RESULTS", results)
    monkeypatch.setattr(benchmark, "SMOKE_OUT", tmp_path / "runs" / "smoke.json")
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    benchmark.main(["--smoke", "--only", "main", "--runs", "before_small", "--workdir", str(tmp_path / "work")])
    assert committed.read_bytes() == (benchmark.REPO / "results" / "benchmark.json").read_bytes()
    smoke = json.loads((tmp_path / "runs" / "smoke.json").read_text())
    assert [r["name"] for r in smoke["runs"]] == ["before_small"]


def test_rows_of_another_gpu_are_kept_unless_replacing_is_asked(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the fake file's GPU must differ from this machine's")
    out = tmp_path / "h200.json"
    h200 = {"gpu": "NVIDIA H200", "date": "2026-11-29", "runs": [{"name": "before_small", "tokens_per_second": 7626}]}
    out.write_text(json.dumps(h200))
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    argv = ["--smoke", "--only", "main", "--runs", "before_small", "--out", str(out), "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as refused:
        benchmark.main(argv)
    assert refused.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "NVIDIA H200" in err[0] and "--replace-gpu" in err[0]
    assert json.loads(out.read_text()) == h200  # untouched

    benchmark.main([*argv, "--replace-gpu"])
    replaced = json.loads(out.read_text())
    assert replaced["gpu"] == "cpu" and replaced["runs"] == [fake_run_one({"name": "before_small",
                                                                           "script": "before_small"}, None)]


def test_only_rows_that_compile_warm_the_compile_cache_first():
    """A row warms the compile cache when its script compiles: compile not switched off, and enough steps."""
    import benchmark

    rows = {r["name"]: r for r in benchmark.GROUPS["main"]}
    assert benchmark.compiles(rows["lightweight_small"]) and benchmark.compiles(rows["lightweight_small-16gib"])
    assert not benchmark.compiles(rows["peer-run_clm"])  # --off compile
    assert not benchmark.compiles(rows["lightweight_big"]) and not benchmark.compiles(rows["before_small"])
    assert not benchmark.compiles(next(r for r in benchmark.GROUPS["ablation_small"] if r["ablation"] == "compile"))
    short = dict(rows["lightweight_small"], argv=["--max-steps", str(lightweight_small.COMPILE_PAYS_FROM_STEPS - 1)])
    assert not benchmark.compiles(short)  # too short for the script to compile: nothing to warm
