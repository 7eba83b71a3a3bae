"""The ground floor: names and formats that more than one part of moe-monitor shares, as data and pure code.

`vocabulary` holds every exported metric, label, capture outcome and detector state; `flight_record` the flight
record's format (its file name, size bound, and the checked reading of one); `segment` the segment format's
limits that exported help texts name; `api` what the sidecar's HTTP answers and its clients agree on. Nothing
here imports another moe_monitor package, so every other package may import it (tests/test_floors.py).
"""
