"""Drives the Event Hubs emulator with Microsoft's own client (PyPI azure-eventhub) and prints what
the SDK saw as one JSON object; tests/emulators_sdk.rs compares it with the emulator.

    python eh_sdk_check.py CONNECTION_STRING

Publishes a batch to partition 0, a batch to partition 1, three events with one partition key;
reads the hub's and partitions' properties; then reads every non-empty partition from its earliest
event, partition 0 from an inclusive sequence number and partition 1 from an exclusive one.
"""
import json
import sys
import threading

from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient
from azure.eventhub._pyamqp import _platform

# azure-eventhub 5.15's pyamqp reads every TCP option of a new socket and sets it back; on loopback
# the MSS it reads (65483) is above what Linux accepts back (32767), so connecting to 127.0.0.1
# fails now and then with EINVAL. Not an emulator matter (Azure is not on loopback): leave that
# one option alone. azure-servicebus 7.15's copy of pyamqp does not list it any more.
_platform.KNOWN_TCP_OPTS.discard("TCP_MAXSEG")


def read(conn_str, partition, starting_position, inclusive, n):
    """The first n events of a partition from a starting position (bounded: 30 s)."""
    got, done = [], threading.Event()
    client = EventHubConsumerClient.from_connection_string(conn_str, consumer_group="$Default")

    def on_event(ctx, event):
        if event is None or done.is_set():
            return
        got.append(
            {
                "body": event.body_as_str(),
                "partition": ctx.partition_id,
                "sequence_number": event.sequence_number,
                "offset": str(event.offset),
                "properties": {
                    (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in (event.properties or {}).items()
                },
                "partition_key": event.partition_key.decode() if isinstance(event.partition_key, bytes) else event.partition_key,
            }
        )
        if len(got) >= n:
            done.set()

    worker = threading.Thread(
        target=client.receive,
        kwargs=dict(
            on_event=on_event,
            partition_id=partition,
            starting_position=starting_position,
            starting_position_inclusive=inclusive,
            max_wait_time=1,
        ),
        daemon=True,
    )
    worker.start()
    done.wait(30)
    client.close()
    worker.join(10)
    return got


def step(what):
    print(what, file=sys.stderr, flush=True)


def main():
    conn_str = sys.argv[1]
    out = {}
    with EventHubProducerClient.from_connection_string(conn_str) as producer:
        out["partition_ids"] = producer.get_partition_ids()
        step("partition ids")
        for partition, prefix in (("0", "a"), ("1", "b")):
            batch = producer.create_batch(partition_id=partition)
            for i in range(3):
                batch.add(EventData(f"{prefix}{i}"))
            producer.send_batch(batch)
            step(f"sent to partition {partition}")
        keyed = producer.create_batch(partition_key="device-42")
        for i in range(3):
            e = EventData(f"k{i}")
            e.properties = {"iotcentral-device-id": "device-42", "i": str(i)}
            keyed.add(e)
        producer.send_batch(keyed)
        out["partitions"] = {p: producer.get_partition_properties(p) for p in out["partition_ids"]}
        for props in out["partitions"].values():
            for k, v in list(props.items()):
                if not isinstance(v, (str, int, float, bool, type(None))):
                    props[k] = str(v)
    step("partition properties")
    # every partition from its earliest event, as many events as its properties announce
    out["events"] = {
        p: read(conn_str, p, "-1", False, props["last_enqueued_sequence_number"] + 1)
        for p, props in out["partitions"].items()
        if not props["is_empty"]
    }
    step("read every partition")
    out["p0_from_seq_1_inclusive"] = read(conn_str, "0", 1, True, 2)
    out["p1_after_seq_0"] = read(conn_str, "1", 0, False, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
