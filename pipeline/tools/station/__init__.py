"""`ecgmon station`: the central station, a web page where nurses watch every bed and handle its alarms.

An operator tool beside the daemon core (the `station` extra; `ecgmon serve` never imports it). It subscribes to
the broker with its own staff login (`config.StationConfig`), keeps every bed's recent ECG, beats and alarms
(`wall.Wall`), and pushes what the page shows to the logged-in browsers over a WebSocket (`app`). Acknowledge and
silence go back to the daemon on `<prefix>/acks/<device>` with the staff member's login. Every asset is served
from this package: hospital networks have no internet.
"""
