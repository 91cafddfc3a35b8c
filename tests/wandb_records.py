"""Read back what an offline W&B run recorded, from its .wandb file (no network, no wandb service).

The file is W&B's transaction log: a 7-byte header, then LevelDB-log framed records (32 KiB blocks, each
chunk with a 7-byte header: crc32c, length, type) holding protobuf `Record`s.
"""
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def read_offline_run(run_dir: Path) -> dict:
    """{'history': [{key: value_json}, ...], 'summary': {...}, 'config': {...}, 'group': run group}."""
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    history, summary, config, group = [], {}, {}, None
    for raw in _records(wandb_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
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
    return {"history": history, "summary": summary, "config": config, "group": group}
