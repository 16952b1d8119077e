"""Publishes JSON-lines records to a Service Bus queue or topic with Microsoft's own client (PyPI
azure-servicebus), so that what centralflow reads is what Azure's SDK writes.

    python sb_publish.py CONNECTION_STRING FILE (--queue Q | --topic T) [--message-id-prefix P] [--batch N]

Each line of FILE is {"body": "<exact body text>", "properties": {<application properties>}}.
The body is sent as the exact UTF-8 text given (one data section). With a prefix, line k (from 0)
gets message id P + str(k). Messages go out in ServiceBusMessageBatch batches of at most N
(default 100; a batch is closed earlier when the SDK says it is full). Prints the number sent.
"""
import argparse
import json
import sys

from azure.servicebus import ServiceBusClient, ServiceBusMessage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("connection_string")
    ap.add_argument("file")
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--queue")
    target.add_argument("--topic")
    ap.add_argument("--message-id-prefix")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()

    sent = 0
    with ServiceBusClient.from_connection_string(args.connection_string) as client:
        sender = client.get_queue_sender(args.queue) if args.queue else client.get_topic_sender(args.topic)
        with sender:
            batch, in_batch = sender.create_message_batch(), 0
            with open(args.file, encoding="utf-8") as f:
                for k, line in enumerate(f):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    msg = ServiceBusMessage(
                        record["body"].encode("utf-8"),
                        application_properties=record.get("properties") or None,
                        message_id=(args.message_id_prefix + str(k)) if args.message_id_prefix is not None else None,
                    )
                    if in_batch >= args.batch:
                        sender.send_messages(batch)
                        sent += in_batch
                        batch, in_batch = sender.create_message_batch(), 0
                    try:
                        batch.add_message(msg)
                    except ValueError:  # the batch is full (size): send it, start the next one
                        sender.send_messages(batch)
                        sent += in_batch
                        batch, in_batch = sender.create_message_batch(), 0
                        batch.add_message(msg)
                    in_batch += 1
            if in_batch:
                sender.send_messages(batch)
                sent += in_batch
    print(sent)


if __name__ == "__main__":
    sys.exit(main())
