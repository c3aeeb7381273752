"""What mosquitto does with the requests of a shared-subscription member that dies and never comes back.

Two members of `$share/g/probe/+` with persistent MQTT 5 sessions (session expiry --expiry s) and manual
acknowledgement, as markerless replicas run. Member A receives without acknowledging and is killed with SIGKILL;
member B acknowledges everything. The probe publishes a first batch (half goes to A and stays unacknowledged),
kills A, publishes a second batch while A is away, waits past A's session expiry, and reports where every
message went: B, A's unacknowledged in-flight window, or nowhere.

    python bench/probe_shared_inflight.py [--expiry 10] [--batch 20]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from mqtt_rig import Broker, client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MEMBER = """
import sys, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
port, expiry = int(sys.argv[1]), int(sys.argv[2])
c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="member-a",
                protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
c.on_connect = lambda c, *a: c.subscribe("$share/g/probe/+", qos=1)
c.on_message = lambda c, u, m: print(m.payload.decode(), flush=True)  # never acknowledged
p = Properties(PacketTypes.CONNECT); p.SessionExpiryInterval = expiry
c.connect("127.0.0.1", port, 30, clean_start=False, properties=p)
c.loop_forever()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expiry", type=int, default=10, help="session expiry of the members, seconds")
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        got_b: list[str] = []
        lock = threading.Lock()
        b = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="member-b",
                        protocol=MQTTProtocolVersion.MQTTv5)
        b.on_connect = lambda c, *a: c.subscribe("$share/g/probe/+", qos=1)

        def on_b(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            with lock:
                got_b.append(m.payload.decode())

        b.on_message = on_b
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = args.expiry
        b.connect("127.0.0.1", broker.port, 30, clean_start=False, properties=props)
        b.loop_start()
        member_a = subprocess.Popen([sys.executable, "-c", MEMBER, str(broker.port), str(args.expiry)],
                                    stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)  # both members subscribed (a probe, not a test)
        pub = client(broker.port)
        for i in range(args.batch):
            pub.publish("probe/x", f"first-{i}")
        time.sleep(2.0)
        member_a.send_signal(signal.SIGKILL)
        member_a.wait()
        got_a = member_a.stdout.read().split() if member_a.stdout else []
        with lock:
            b_before = len(got_b)
        for i in range(args.batch):
            pub.publish("probe/x", f"second-{i}")
        time.sleep(2.0)
        with lock:
            b_while_away = len(got_b) - b_before
        time.sleep(args.expiry + 5.0)  # A's session expires
        with lock:
            b_final = list(got_b)
        broker.stop()
    sent = [f"first-{i}" for i in range(args.batch)] + [f"second-{i}" for i in range(args.batch)]
    lost = [m for m in sent if m not in b_final]
    report = {
        "published": len(sent), "a_received_unacknowledged": len(got_a), "b_received_before_kill": b_before,
        "b_received_while_a_away": b_while_away, "b_received_total": len(b_final),
        "never_reached_b": len(lost), "never_reached_b_of_second_batch": sum(m.startswith("second") for m in lost),
        "redistributed_after_expiry": len(b_final) - b_before - b_while_away,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
