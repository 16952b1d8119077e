"""Prints the dead-lettered messages of a Service Bus queue or subscription, read back with
Microsoft's own client (PyPI azure-servicebus), one JSON object a line:
{"body", "reason", "description", "application_properties", "delivery_count"}.

    python sb_dead_letters.py CONNECTION_STRING (--queue Q | --topic T --subscription S)

The messages are peeked (not received): they stay in the dead-letter queue, unlocked.
"""
import argparse
import json

from azure.servicebus import ServiceBusClient, ServiceBusSubQueue


def text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("connection_string")
    ap.add_argument("--queue")
    ap.add_argument("--topic")
    ap.add_argument("--subscription")
    args = ap.parse_args()
    if bool(args.queue) == bool(args.topic) or bool(args.topic) != bool(args.subscription):
        ap.error("give --queue Q, or --topic T --subscription S")

    with ServiceBusClient.from_connection_string(args.connection_string) as client:
        if args.queue:
            receiver = client.get_queue_receiver(args.queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        else:
            receiver = client.get_subscription_receiver(
                args.topic, args.subscription, sub_queue=ServiceBusSubQueue.DEAD_LETTER
            )
        with receiver:
            next_seq = 0
            while True:
                batch = receiver.peek_messages(max_message_count=250, sequence_number=next_seq)
                if not batch:
                    break
                for m in batch:
                    body = b"".join(m.body) if not isinstance(m.body, (bytes, str)) else m.body
                    print(
                        json.dumps(
                            {
                                "body": text(body),
                                "reason": m.dead_letter_reason,
                                "description": m.dead_letter_error_description,
                                "application_properties": {
                                    text(k): text(v) for k, v in (m.application_properties or {}).items()
                                },
                                "delivery_count": m.delivery_count,
                            }
                        )
                    )
                next_seq = batch[-1].sequence_number + 1


if __name__ == "__main__":
    main()
