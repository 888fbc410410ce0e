#!/usr/bin/env python3
"""A TCP relay that misbehaves on command: the upstream side of a soak run.

    fault-relay.py LISTEN_ADDR TARGET_ADDR MODE_FILE

Forwards every connection to TARGET_ADDR. The bytes flowing back from the target (the
responses) are damaged according to the word in MODE_FILE, re-read for every chunk so that
pooled keep-alive connections change behaviour too:

    pass   forward untouched
    cut    close the connection, on average once per ~2.5 MiB
    flip   XOR one byte, on average once per ~2.5 MiB (headers included: also hostile)
    slow   trickle at about 32 KiB/s

Loopback only; it stops on SIGTERM. Counts of what it did go to stdout once a second when
they change, so the soak log shows the faults really happened.
"""

import asyncio
import random
import signal
import sys

CHUNK = 64 * 1024
FAULT_ODDS = 40  # one chunk in FAULT_ODDS: ~2.5 MiB between faults
counts = {"conns": 0, "cut": 0, "flip": 0, "slow_chunks": 0}


def mode(path):
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or "pass"
    except OSError:
        return "pass"


async def forward(reader, writer, mode_file):
    """Target -> client, with faults."""
    sent = 0
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            m = mode(mode_file) if mode_file else "pass"
            if m == "cut" and random.randrange(FAULT_ODDS) == 0:
                counts["cut"] += 1
                writer.write(data[: random.randrange(len(data))])
                await writer.drain()
                break
            if m == "flip" and random.randrange(FAULT_ODDS) == 0:
                b = bytearray(data)
                b[random.randrange(len(b))] ^= 0x20
                data = bytes(b)
                counts["flip"] += 1
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if m == "slow":
                counts["slow_chunks"] += 1
                await asyncio.sleep(len(data) / 32768)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(client_r, client_w, target, mode_file):
    counts["conns"] += 1
    host, port = target.rsplit(":", 1)
    try:
        up_r, up_w = await asyncio.open_connection(host, int(port))
    except OSError:
        client_w.close()
        return
    await asyncio.gather(
        forward(client_r, up_w, None),
        forward(up_r, client_w, mode_file),
        return_exceptions=True,
    )


async def report():
    last = None
    while True:
        await asyncio.sleep(1)
        now = dict(counts)
        if now != last:
            print(" ".join(f"{k}={v}" for k, v in now.items()), flush=True)
            last = now


async def main():
    listen, target, mode_file = sys.argv[1:4]
    host, port = listen.rsplit(":", 1)
    if not host.startswith("127."):
        sys.exit("fault-relay: loopback addresses only")
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, target, mode_file), host, int(port)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reporter = asyncio.create_task(report())
    async with server:
        await stop.wait()
    reporter.cancel()
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
