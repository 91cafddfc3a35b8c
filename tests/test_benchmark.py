"""benchmark.py's machinery on the CPU (`--smoke`: tiny models, no budgets): the rows it writes and its report."""
import json

import benchmark

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
