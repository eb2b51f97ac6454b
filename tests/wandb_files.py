"""Reading what an offline wandb run wrote, for tests: its run-*.wandb file is a LevelDB-style log in 32 KiB
blocks after a 7-byte header; each chunk has a 7-byte header (checksum, length, kind: 1 full, 2 first,
3 middle, 4 last) and the chunks of one record join into a protobuf `Record`."""
import json


def wandb_records(run_file) -> list:
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, partial = run_file.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(partial))
    return records


def wandb_history(run_file) -> dict:
    """{step: {key: value}} from the run's history records."""
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    return history
