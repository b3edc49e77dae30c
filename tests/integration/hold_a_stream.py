"""Run in a child process: hold one long chat stream open through a router.

Usage: python hold_a_stream.py URL KEY BODY_JSON OUT_FILE   (BODY_JSON: a streamed chat request)
Prints the answer's status on stdout once its head arrived, then writes every byte of
the stream to OUT_FILE until the stream ends or the process is killed (killing it closes
the connection, as a client that goes away would).

A process rather than a thread of the test: the test's own requests then share nothing
with the stream but the router.
"""

from __future__ import annotations

import json
import sys

import httpx


def main() -> None:
    url, key, body, out_file = sys.argv[1:5]
    payload = json.loads(body)
    headers = {"Authorization": f"Bearer {key}"}
    with (
        open(out_file, "wb", buffering=0) as out,
        httpx.Client(timeout=120, trust_env=False) as client,
        client.stream(
            "POST", f"{url}/v1/chat/completions", json=payload, headers=headers
        ) as stream,
    ):
        print(stream.status_code, flush=True)
        for chunk in stream.iter_bytes():
            out.write(chunk)


if __name__ == "__main__":
    main()
