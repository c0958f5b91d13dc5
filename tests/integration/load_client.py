"""A client process for concurrency tests: `python -m tests.integration.load_client URL ALIAS... --rounds N`.

Each round does an atomic query and a separate write + read pair with tokens unique to this process,
and counts any answer that is not its own. Prints one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from visabus.sdk import Client
from visabus.sdk.errors import VisaBusError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("aliases", nargs="+")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hold-lock", default=None, help="take an exclusive lock on this alias and wait forever")
    args = parser.parse_args()
    with Client(args.url, name=f"load-{os.getpid()}", timeout=20_000) as bus:
        if args.hold_lock:
            bus.open(args.hold_lock).lock()
            print(json.dumps({"locked": True}), flush=True)
            while True:
                time.sleep(3600)  # held until the test kills this process
        instruments = [bus.open(a) for a in args.aliases]
        counts = {"ok": 0, "mismatch": 0, "errors": 0, "error_names": []}
        me = os.getpid()
        for i in range(args.rounds):
            for inst in instruments:
                token = f"q-{me}-{i}"
                try:
                    got = inst.query(f"ECHO? {token}")
                    counts["ok" if got == token else "mismatch"] += 1
                    token = f"w-{me}-{i}"
                    inst.write(f"ECHO? {token}")
                    got = inst.read()
                    counts["ok" if got == token else "mismatch"] += 1
                except VisaBusError as exc:
                    counts["errors"] += 1
                    counts["error_names"].append(exc.name)
        print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
