"""Drives the Service Bus emulator with Microsoft's own client (PyPI azure-servicebus) and prints
what the SDK saw as one JSON object; tests/emulators_sdk.rs compares it with the emulator's stats.

    python sb_sdk_check.py CONNECTION_STRING SCENARIO [ARGS]

Scenarios:
  queue QUEUE LOCK_SECONDS     send 5, then complete / abandon / dead-letter / renew / let a lock expire
  topic TOPIC SUB1 SUB2 [N]    send 3 to the topic, receive and complete N (3) from both subscriptions
  receive_and_delete QUEUE     send 3, receive them in RECEIVE_AND_DELETE mode
  abandon_all QUEUE N          receive N messages in peek-lock and abandon each (max delivery count)
  compete QUEUE N              two receivers on one queue take N messages between them, complete them
  lock_lost QUEUE              settle a message whose lock expired (after it came back): lock lost
  prefetch QUEUE N             one receive of up to N with a prefetch of N; the messages stay locked
  bad_key QUEUE                send with a connection string whose key is wrong
"""
import json
import sys
import time

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue


def view(m):
    return {
        "body": str(m),
        "message_id": m.message_id,
        "content_type": m.content_type,
        "sequence_number": m.sequence_number,
        "delivery_count": m.delivery_count,
        "lock_token": str(m.lock_token) if m.lock_token else None,
        "locked_until": m.locked_until_utc.timestamp() if m.locked_until_utc else None,
        "enqueued_time": m.enqueued_time_utc.timestamp() if m.enqueued_time_utc else None,
        "application_properties": {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (m.application_properties or {}).items()
        },
        "dead_letter_reason": m.dead_letter_reason,
        "dead_letter_error_description": m.dead_letter_error_description,
        "dead_letter_source": m.dead_letter_source,
    }


def receive(receiver, n, wait):
    """Receives until n messages arrived or `wait` seconds passed."""
    out = []
    deadline = time.time() + wait
    while len(out) < n and time.time() < deadline:
        out += receiver.receive_messages(max_message_count=n - len(out), max_wait_time=max(0.5, deadline - time.time()))
    return out


def queue(client, name, lock_seconds):
    lock_seconds = float(lock_seconds)
    result = {}
    with client.get_queue_sender(name) as sender:
        sender.send_messages(
            [ServiceBusMessage(f"m{i}", message_id=f"id-{i}", application_properties={"i": i, "kind": "test"}) for i in range(5)]
        )
    with client.get_queue_receiver(name) as receiver:
        first = receive(receiver, 5, 20)
        result["first"] = [view(m) for m in first]
        m0, m1, m2, m3, m4 = first
        receiver.complete_message(m0)
        receiver.abandon_message(m1)
        again = receive(receiver, 1, 20)
        result["abandoned_again"] = [view(m) for m in again]
        receiver.complete_message(again[0])
        receiver.dead_letter_message(m2, reason="Malformed", error_description="not JSON at byte 3")
        before = m3.locked_until_utc.timestamp()
        time.sleep(0.3)  # so that the renewed expiry is measurably later than the first one
        after = receiver.renew_message_lock(m3).timestamp()
        result["renew"] = {"before": before, "after": after}
        receiver.complete_message(m3)
        # m4's lock runs out: the queue delivers it again (receive waits for it, no sleep)
        expired = receive(receiver, 1, lock_seconds + 20)
        result["expired_again"] = [view(m) for m in expired]
        result["expired_at"] = time.time()
        result["m4_locked_until"] = m4.locked_until_utc.timestamp()
        receiver.complete_message(expired[0])
    with client.get_queue_receiver(name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        # peeked, not received: the message stays in the dead-letter queue, unlocked
        result["dead_letters"] = [view(m) for m in dlq.peek_messages(max_message_count=10)]
    return result


def topic(client, name, sub1, sub2, expect=3):
    expect = int(expect)
    result = {}
    with client.get_topic_sender(name) as sender:
        batch = sender.create_message_batch()
        for i in range(3):
            batch.add_message(ServiceBusMessage(f"t{i}", application_properties={"i": i}))
        sender.send_messages(batch)
    for sub in (sub1, sub2):
        with client.get_subscription_receiver(name, sub) as receiver:
            got = receive(receiver, expect, 20)
            for m in got:
                receiver.complete_message(m)
            result[sub] = [view(m) for m in got]
    return result


def receive_and_delete(client, name):
    with client.get_queue_sender(name) as sender:
        sender.send_messages([ServiceBusMessage(f"r{i}") for i in range(3)])
    with client.get_queue_receiver(name, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        got = receive(receiver, 3, 20)
    return {"received": [view(m) for m in got]}


def abandon_all(client, name, n):
    n = int(n)
    seen = []
    with client.get_queue_receiver(name) as receiver:
        for m in receive(receiver, n, 30):
            seen.append(view(m))
            receiver.abandon_message(m)
    return {"abandoned": seen}


def compete(client, name, n):
    n = int(n)
    with client.get_queue_receiver(name) as a, client.get_queue_receiver(name) as b:
        got_a = a.receive_messages(max_message_count=n // 2, max_wait_time=10)
        got_b = b.receive_messages(max_message_count=n, max_wait_time=10)
        for r, got in ((a, got_a), (b, got_b)):
            for m in got:
                r.complete_message(m)
        return {"a": [view(m) for m in got_a], "b": [view(m) for m in got_b]}


def lock_lost(client, name):
    with client.get_queue_sender(name) as sender:
        sender.send_messages(ServiceBusMessage("late"))
    with client.get_queue_receiver(name) as receiver:
        old = receive(receiver, 1, 20)[0]
        # the lock runs out and the message comes back (receive waits for it, no sleep)
        new = receive(receiver, 1, 60)[0]
        try:
            # past the SDK's own expiry check, to the link: the emulator must refuse it
            receiver._settle_message(old, "complete")  # pylint: disable=protected-access
            error = None
        except Exception as e:  # the SDK's error for the emulator's answer is what is checked
            error = {"type": type(e).__name__, "message": str(e)[:300]}
        receiver.complete_message(new)
    return {"old": view(old), "new": view(new), "error": error}


def prefetch(client, name, n):
    n = int(n)
    with client.get_queue_receiver(name, prefetch_count=n) as receiver:
        got = receive(receiver, n, 60)
        return {"received": len(got), "distinct": len({m.sequence_number for m in got})}


def bad_key(conn_str, name):
    parts = [p for p in conn_str.split(";") if not p.startswith("SharedAccessKey=")]
    parts.append("SharedAccessKey=d3Jvbmcta2V5")
    try:
        with ServiceBusClient.from_connection_string(";".join(parts), retry_total=0) as client:
            with client.get_queue_sender(name) as sender:
                sender.send_messages(ServiceBusMessage("never"))
        return {"error": None}
    except Exception as e:  # the SDK's own error type is what the test looks at
        return {"error": type(e).__name__, "message": str(e)[:300]}


def main():
    conn_str, scenario, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if scenario == "bad_key":
        out = bad_key(conn_str, *args)
    else:
        with ServiceBusClient.from_connection_string(conn_str) as client:
            out = {"queue": queue, "topic": topic, "compete": compete, "prefetch": prefetch, "lock_lost": lock_lost, "receive_and_delete": receive_and_delete, "abandon_all": abandon_all}[
                scenario
            ](client, *args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
