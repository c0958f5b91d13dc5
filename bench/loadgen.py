"""One many-clients load process (started by bench/run.py): its own Client, back-to-back ECHO? queries.

Protocol with the parent: print "ready" after connecting and warming up; read one line with the
absolute start time (time.time()); query until start + duration; print one JSON line with the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--resource", required=True)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()

    from visabus.sdk import Client

    with Client(args.broker, name=f"bench-load-{args.client}") as bus:
        inst = bus.open(args.resource, timeout=10_000)
        for i in range(20):
            inst.query(f"ECHO? warm{args.client}x{i}")
        print("ready", flush=True)
        start = float(sys.stdin.readline())
        time.sleep(max(0.0, start - time.time()))
        end = time.perf_counter() + args.duration
        lat_us: list[int] = []
        errors = mismatches = 0
        clock = time.perf_counter
        seq = 0
        t_begin = clock()
        while True:
            t = clock()
            if t >= end:
                break
            token = f"c{args.client}n{seq}"
            seq += 1
            try:
                answer = inst.query(f"ECHO? {token}")
            except Exception:  # noqa: BLE001 - counted, not fatal: the benchmark reports errors
                errors += 1
                continue
            lat_us.append(int((clock() - t) * 1e6))
            if answer != token:
                mismatches += 1
        elapsed = clock() - t_begin
        inst.close()
    print(json.dumps({"count": len(lat_us), "errors": errors, "mismatches": mismatches, "elapsed_s": elapsed,
                      "lat_us": lat_us}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
