"""benchmark.py's machinery on the CPU (`--smoke`: tiny models, no budgets): the rows and block it writes, its report."""
import json

import pytest

import benchmark

ROW_KEYS = {"script", "techniques", "ablation", "budget_gib", "micro_batch", "seq_len", "tokens_per_second", "mfu",
            "peak_memory_gib", "train_seconds", "eval_loss", "oom", "group"}
BLOCK_KEYS = {"command", "gpu", "date", "versions", "commit"}


def test_smoke_run_writes_rows_a_block_per_command_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the child processes' default cache
    argv = ["--smoke", "--only", "small,big", "--runs", "lightweight_small,peer-trainer_compile,reference_qlora",
            "--results-dir", str(tmp_path / "results"), "--workdir", str(tmp_path / "runs")]
    benchmark.main(argv)
    result = json.loads((tmp_path / "results" / "benchmark.json").read_text())
    assert set(result["commands"]) == {"small", "big"}
    for block in result["commands"].values():
        assert BLOCK_KEYS <= block.keys() and block["versions"]["torch"] and block["gpu"] == "cpu"
        assert block["command"] == ("python benchmark.py --smoke --only small,big "
                                    "--runs lightweight_small,peer-trainer_compile,reference_qlora")
    rows = {r["name"]: r for r in result["runs"]}
    assert set(rows) == {"lightweight_small", "peer-trainer_compile", "reference_qlora"}
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert row["error"] is None and row["oom"] is False
        assert row["tokens_per_second"] > 0 and row["eval_loss"] > 0 and row["curves"]["train"]
    assert rows["reference_qlora"]["group"] == "big" and "kbit_prep" in rows["reference_qlora"]["techniques"]
    assert "fused_ce" not in rows["peer-trainer_compile"]["techniques"]

    table = (tmp_path / "results" / "benchmark.md").read_text()
    assert "| reference_qlora |" in table and "## small" in table and "## big" in table
    assert "lightweight_small vs peer-trainer_compile:" in table  # the ratio of two rows of one command
    assert {p.name for p in (tmp_path / "results").glob("*.png")} == {"loss_small.png", "loss_big.png",
                                                                      "speed_memory.png"}


def fake_run_one(spec, workdir, smoke=False):
    """A row without running anything: these tests are about where rows go (run_one is tested above)."""
    return {"name": spec["name"], "script": spec["script"], "error": None, "tokens_per_second": 1.0}


def test_a_group_run_again_replaces_its_rows_and_keeps_the_other_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    results = tmp_path / "results"
    path = results / "benchmark.json"
    results.mkdir()
    block = {"command": "python benchmark.py", "gpu": "cpu", "date": "2026-12-01", "versions": {}, "commit": None}
    old = {"commands": {"small": block, "big": block},
           "runs": [{"name": "stale-small-row", "group": "small"}, {"name": "lightweight_big", "group": "big"}]}
    path.write_text(json.dumps(old))
    benchmark.main(["--smoke", "--only", "small", "--results-dir", str(results), "--workdir", str(tmp_path / "w")])
    names = [r["name"] for r in json.loads(path.read_text())["runs"]]
    small = [spec["name"] for spec in benchmark.GROUPS["small"] if "--gpu-memory-gib" not in spec["argv"]]
    assert names == ["lightweight_big", *small]  # the stale row gone, the other group's row kept


def test_rows_of_another_gpu_are_never_mixed_into_a_file(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the fake file's GPU must differ from this machine's")
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    path = tmp_path / "benchmark.json"
    h200 = {"commands": {"big": {"gpu": "NVIDIA H200"}}, "runs": [{"name": "lightweight_big", "group": "big"}]}
    path.write_text(json.dumps(h200))
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--smoke", "--only", "small", "--results-dir", str(tmp_path), "--workdir", str(tmp_path / "w")])
    assert refused.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "NVIDIA H200" in err[0] and "--results-dir" in err[0]
    assert json.loads(path.read_text()) == h200  # untouched


def test_an_unknown_group_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--smoke", "--only", "small,headline"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == ("benchmark.py: error: unknown group(s): headline; known: "
                                               + ", ".join(benchmark.GROUPS))


@pytest.mark.parametrize("argv, line", [
    (["--only", "small", "--runs", "lightweight_smal", "--results-dir", "x"],
     "benchmark.py: error: --runs: no row lightweight_smal in small"),
    (["--only", "small", "--runs", "lightweight_small"],
     "benchmark.py: error: --runs reruns part of a group: give --results-dir, so that results/ keeps whole groups")])
def test_a_partial_or_misspelt_run_is_refused_before_anything_runs(argv, line, capsys):
    with pytest.raises(SystemExit) as refused:
        benchmark.main(argv)
    assert refused.value.code == 2 and capsys.readouterr().err.strip() == line


def test_where_the_files_went_is_no_part_of_a_blocks_command(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_one", fake_run_one)
    benchmark.main(["--smoke", "--only", "small", "--runs", "before_small", f"--results-dir={tmp_path}",
                    "--workdir", str(tmp_path / "w")])
    block = json.loads((tmp_path / "benchmark.json").read_text())["commands"]["small"]
    assert block["command"] == "python benchmark.py --smoke --only small --runs before_small"


def test_a_results_dir_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "results").write_text("")
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--smoke", "--only", "small", "--results-dir", str(tmp_path / "results"), "--workdir",
                        str(tmp_path / "w")])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == (f"benchmark.py: error: --results-dir {tmp_path / 'results'}: "
                                               f"{tmp_path / 'results'} is a file")
