"""A long collector outage under load: does the daemon's memory stay within its export buffer's bound?

A lab Envoy (one worker), the daemon exporting over OTLP/gRPC with --sampler always_on --cpu-budget 0 (every
request traced: the most spans per second) and --export-buffer-mb MIB; the collector is stopped (its port
closed) right after the daemon starts and stays down for --minutes while h2load offers --rate keep-alive
requests per second. Every --every seconds the daemon's resident memory is sampled. At the end the collector
comes back for --recover seconds before the daemon stops; the summary gives the buffer's peak, what it let go
(export_buffer_full) and what reached the collector afterwards.

Usage (root, after scripts/setup.sh):
  .venv/bin/python bench/export_outage.py [--minutes 10] [--rate 2000] [--buffer-mb 16]
Writes bench/results/export_outage-<timestamp>.json and prints the memory samples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_envoy.lab.lab import EnvoyLab  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the outage; write the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=2000, help="keep-alive requests per second offered")
    ap.add_argument("--buffer-mb", type=float, default=16.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--recover", type=float, default=20.0, help="seconds with the collector back at the end")
    args = ap.parse_args(argv)
    h2load = shutil.which("h2load")
    if h2load is None:
        print("export_outage: h2load is needed (apt install nghttp2-client)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="export-outage-"))
    summary = workdir / "summary.json"
    samples: list[dict[str, float]] = []
    with EnvoyLab(concurrency=1) as lab:
        rx = OtlpReceiver().start()
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol",
                                "grpc", "--sampler", "always_on", "--cpu-budget", "0", "--export-buffer-mb",
                                str(args.buffer_mb), "--summary-json", str(summary)], workdir).start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        rx.stop()
        seconds = int(args.minutes * 60)
        conns = 10
        load = subprocess.Popen([h2load, "--h1", "-c", str(conns), "--rps", str(args.rate / conns),
                                 "-D", str(seconds), f"http://127.0.0.1:{lab.http_port}/"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        start = time.monotonic()
        while load.poll() is None:
            samples.append({"t_s": round(time.monotonic() - start, 1), "rss_kib": rss_kib(pid)})
            last = samples[-1]
            print(f"{last['t_s']:7.1f} s  daemon RSS {last['rss_kib'] / 1024:7.1f} MiB", flush=True)
            time.sleep(args.every)
        load_out = load.stdout.read() if load.stdout else ""
        rx.start(same_ports=True)
        time.sleep(args.recover)
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_kib": rss_kib(pid)})
        code = daemon.stop()
        received = len(rx.spans())
        rx.stop()
    stats = json.loads(summary.read_text())
    otlp = stats["export"]["sinks"]["otlp-grpc"]
    first = next((s["rss_kib"] for s in samples if s["t_s"] >= 30), samples[0]["rss_kib"])
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "minutes": args.minutes, "rate": args.rate,
        "buffer_mb": args.buffer_mb, "daemon_exit": code, "samples": samples,
        "rss_mib_at_30s": first / 1024, "rss_mib_max": max(s["rss_kib"] for s in samples) / 1024,
        "otlp_sink": otlp, "spans_received_after_recovery": received,
        "drops": stats["drops"], "accounting_holds": all(s["holds"] for s in stats["accounting"].values()),
        "h2load": [line for line in load_out.splitlines() if "requests:" in line or "finished in" in line],
    }
    out = ROOT / "bench" / "results" / f"export_outage-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
