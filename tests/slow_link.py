"""moto's S3 behind a `SlowLink`, in a process of its own, so that the server's Python does not share
the measured loader's interpreter lock: the loader meets a store 20 ms and 100 MB/s away, as on S3.

    with LinkedS3(latency=0.02, bandwidth=100e6) as s3:
        write through s3.storage_options (straight to moto), read through s3.link_options;
        s3.take() is what crossed the link since the last take.

Run as a script, it serves until its stdin closes: one JSON line with both endpoints, then for
each line it reads one JSON line of what crossed the link since the last (`SlowLink.take`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

KEYS = {"key": "testing", "secret": "testing"}


class LinkedS3:
    """moto's S3 (`storage_options`: straight to it) and a SlowLink before it (`link_options`,
    `link_endpoint`), served by a child process on 127.0.0.1, stopped by `stop`."""

    def __init__(self, *, latency: float = 0.02, bandwidth: float = 100e6) -> None:
        script = Path(__file__).resolve()
        self._process = subprocess.Popen(
            [sys.executable, str(script), repr(latency), repr(bandwidth)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=script.parent,
        )
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the S3 behind a slow link exited with {self._process.wait()} before serving")
        endpoints = json.loads(line)
        self.endpoint, self.link_endpoint = endpoints["s3"], endpoints["link"]

    @property
    def storage_options(self) -> dict:
        """s3fs's options, straight to moto (for writing the data: nothing counted)."""
        return {"endpoint_url": self.endpoint, **KEYS}

    @property
    def link_options(self) -> dict:
        """s3fs's options, through the slow link."""
        return {"endpoint_url": self.link_endpoint, **KEYS}

    def take(self) -> dict[str, dict[str, int]]:
        """{"requests": {kind: n}, "bytes": {kind: body bytes}} that crossed the link since the last
        take (kinds: HTTP methods, and LIST for a GET of a bucket)."""
        self._process.stdin.write("take\n")
        self._process.stdin.flush()
        return json.loads(self._process.stdout.readline())

    def cpu_seconds(self) -> float:
        """CPU seconds the stand-in (moto and the link: the child process) has used so far, from
        Linux's /proc: what serving requests costs on this machine, which real S3 does not."""
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=30)

    def __enter__(self) -> LinkedS3:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(latency: float, bandwidth: float) -> None:
    from faults import SlowLink
    from servers import S3Server

    s3 = S3Server().start()
    link = SlowLink(s3.endpoint, latency=latency, bandwidth=bandwidth).start()
    try:
        print(json.dumps({"s3": s3.endpoint, "link": link.endpoint}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(link.take()), flush=True)
    finally:
        link.stop()
        s3.stop()


if __name__ == "__main__":
    serve(float(sys.argv[1]), float(sys.argv[2]))
