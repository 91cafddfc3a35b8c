"""Read back what an offline W&B run recorded, from its .wandb file (no network).

The file is W&B's transaction log: a 7-byte header, then LevelDB-log framed records (32 KiB blocks, each
chunk with a 7-byte header: crc32 of type and payload, length, type) holding protobuf `Record`s.

When the file is complete (wandb 0.31, wandb-core):
- wandb-core writes the file through a LevelDB log writer that keeps the current, partial 32 KiB block in
  memory: records reach the disk only when a block fills up or when the writer is closed
  (core/pkg/leveldb/record.go: `Next`/`Write` write full blocks only, `Close` -> `writePending`). The writer
  is closed when the run's stream is closed (core/internal/stream/writer.go: `Writer.Do` -> `store.Close()`
  once its input ends; core/internal/stream/stream.go: `Stream.Close`).
- `run.finish()` waits for the exit record's result (wandb/sdk/wandb_run.py `_on_finish`: `deliver_exit`),
  which the writer has by then put in that in-memory block, not on disk, and then only *publishes*
  `inform_finish` (wandb/sdk/lib/service/service_connection.py `inform_finish`: no response is awaited). The
  service closes the stream, and so the file, afterwards, in its own time (core/pkg/server/connection.go
  `handleInformFinish` -> `Stream.Close`). Right after `finish()` returns, a small run's file can hold the
  7-byte header alone, and a larger one only its full blocks.
- `wandb.teardown()` waits: it sends `inform_teardown` on the same connection, which the service handles after
  the `inform_finish` before it (one goroutine handles a connection's requests in order), and then waits for
  the service process to exit (`ServiceConnection.teardown` -> `proc.join()`), which happens only after every
  connection's requests have been handled (core/pkg/server/server.go `Serve`: `wg.Wait()`).
So `read_offline_run` tears the in-process wandb service down before it reads; a run written by a process that
has exited is complete already, since its atexit hook does the same teardown.
"""
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes, name: str = ".wandb file"):
    pos, pending = 7, None
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            raise AssertionError(f"{name}: chunk at byte {pos} is cut off or corrupt ({len(data)} bytes in all)")
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = None
    if pending is not None:
        raise AssertionError(f"{name}: its last record is cut off ({len(data)} bytes in all)")


def settle_wandb() -> None:
    """Have every W&B run this process finished written out in full: wandb.teardown() (see the module doc).

    Refuses while a run is still active, rather than let the teardown finish it for the script under test.
    The next wandb.init() starts a fresh service.
    """
    import wandb

    if wandb.run is not None:
        raise AssertionError(f"W&B run {wandb.run.id} is still active: the script did not finish it")
    wandb.teardown()


def read_offline_run(run_dir: Path) -> dict:
    """{'history': [{key: value_json}, ...], 'summary': {...}, 'config': {...}, 'group': run group}."""
    settle_wandb()
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    data = wandb_file.read_bytes()
    history, summary, config, group, exited, count = [], {}, {}, None, False, 0
    for raw in _records(data, str(wandb_file)):
        record = pb.Record()
        record.ParseFromString(raw)
        count += 1
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item})
        elif kind == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): i.value_json for i in record.summary.update})
        elif kind == "run":
            group = record.run.run_group
            config.update({(i.key or "/".join(i.nested_key)): i.value_json for i in record.run.config.update})
        elif kind == "config":
            config.update({(i.key or "/".join(i.nested_key)): i.value_json for i in record.config.update})
        elif kind == "exit":
            exited = True
    if not exited:  # finish() writes one (deliver_exit); a log without it was not finished or is cut short
        raise AssertionError(f"{wandb_file}: no exit record in its {count} records ({len(data)} bytes): "
                             "the run was not finished, or the file is not written out in full")
    return {"history": history, "summary": summary, "config": config, "group": group}
