"""read_offline_run reads a run's .wandb file only once wandb-core has written it out, however slow the service."""
import json
import threading
from pathlib import Path

import psutil
import pytest
import wandb
from wandb.sdk.lib.service import service_connection

from wandb_records import read_offline_run


def test_reads_the_whole_run_even_when_the_service_closes_it_late(tmp_path, monkeypatch):
    """wandb-core is frozen from the moment finish() asks it to close the run until a second later.

    finish() returns anyway (it does not wait for that close), with the file holding no record yet: the race
    that made the script tests flaky under CPU load, made certain here.
    """
    frozen = []
    inform_finish = service_connection.ServiceConnection.inform_finish

    def inform_finish_to_a_frozen_service(self, run_id):
        frozen.extend(p for p in psutil.Process().children() if p.name().startswith("wandb-core"))
        for process in frozen:
            process.suspend()
        inform_finish(self, run_id)

    monkeypatch.setattr(service_connection.ServiceConnection, "inform_finish", inform_finish_to_a_frozen_service)
    run = wandb.init(project="wandb-records-test", group="slow", dir=str(tmp_path), config={"a": 1})
    for step in range(3):
        run.log({"train/loss": 1.0 / (step + 1)})
    run.summary.update({"oom": False})
    run_dir = Path(run.dir).parent
    try:
        run.finish()
        assert frozen, "no wandb-core process to freeze"
        (wandb_file,) = run_dir.glob("run-*.wandb")
        assert wandb_file.stat().st_size == 7  # the header alone: every record still in wandb-core's memory
    finally:
        resume = threading.Timer(1.0, lambda: [p.resume() for p in frozen])
        resume.start()
    try:
        record = read_offline_run(run_dir)
    finally:
        resume.join()
    assert record["group"] == "slow"
    assert [json.loads(h["train/loss"]) for h in record["history"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert json.loads(record["summary"]["oom"]) is False
    assert json.loads(record["config"]["a"]) == 1


def test_refuses_a_file_without_an_exit_record(tmp_path):
    """A run never finished (or a file cut short) fails with a message, rather than reading as an empty run."""
    run_dir = tmp_path / "offline-run-x"
    run_dir.mkdir()
    (run_dir / "run-x.wandb").write_bytes(b":W&B\xe1\xbe\x00")
    with pytest.raises(AssertionError, match="no exit record"):
        read_offline_run(run_dir)
