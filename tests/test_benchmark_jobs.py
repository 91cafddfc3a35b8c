"""bench/jobs.py: the whole-job rows keep the median of the warm runs, parts and all."""
import pytest

import benchmark
from bench import jobs as benchmark_jobs


def test_job_row_is_the_median_warm_run(tmp_path, monkeypatch):
    timings = iter([(30.0, 0), (18.0, 0), (15.0, 0), (16.0, 0)])  # cold, then three warm runs

    def timed_job(script, out, cache, argv=()):
        seconds, code = next(timings)
        return seconds, code, {"job_seconds": seconds - 0.2, "setup_seconds": seconds / 2, "steps": 10}

    monkeypatch.setattr(benchmark_jobs, "timed_job", timed_job)
    row = benchmark_jobs.job_row("lightweight_small", tmp_path, warm_runs=3)
    assert row["job_seconds_cold"] == 30.0 and row["job_seconds_warm_runs"] == [18.0, 15.0, 16.0]
    assert row["job_seconds"] == 16.0  # the median, and the parts of that same run
    assert row["job_seconds_inside"] == 15.8 and row["parts"]["setup_seconds"] == 8.0
    assert row["error"] is None

    before = dict(row, name="job-before_small", script="before_small", job_seconds=56.0, job_seconds_cold=60.0,
                  job_seconds_warm_runs=[56.0], parts={**row["parts"], "train_seconds": 44.0})
    light = dict(row, parts={**row["parts"], "train_seconds": 4.0})
    lines = "\n".join(benchmark_jobs.job_table({"job-before_small": before, "job-lightweight_small": light}))
    assert "lightweight_small vs before_small: the whole job 3.50x sooner (warm), 2.00x cold" in lines
    assert "Medians of: lightweight_small warm runs 18.0, 15.0, 16.0 s." in lines
    assert "before_small warm runs" not in lines  # one warm run: nothing to say


def test_a_failed_warm_run_is_reported(tmp_path, monkeypatch):
    timings = iter([(30.0, 0), (18.0, 0), (15.0, 3), (16.0, 0)])
    monkeypatch.setattr(benchmark_jobs, "timed_job",
                        lambda script, out, cache, argv=(): (*next(timings), {}))
    assert benchmark_jobs.job_row("lightweight_small", tmp_path, warm_runs=3)["error"] == "exit 0 cold, 3 warm"


def test_job_warm_runs_below_one_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--smoke", "--only", "job", "--job-warm-runs", "0"])
    assert exit_info.value.code == 2 and "--job-warm-runs must be at least 1 (got 0)" in capsys.readouterr().err
