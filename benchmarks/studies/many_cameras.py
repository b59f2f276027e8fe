"""Many cameras on one device: one `edgepipe serve` process serving N live RTSP cameras against N separate
single-stream `camera.py` processes, measured in one run (issue 24).

    python benchmarks/studies/many_cameras.py --model /tmp/cam-default [--cameras 1,4,8,16,24] [--seconds 40]
        [--modes serve,separate] [--transport udp] [--out results.json]

The cameras: one H.264 640x360 clip at 15 fps with a keyframe every 2 s (no B-frames), encoded ONCE, pushed N
times with `ffmpeg -re -stream_loop -1 -c copy` (no re-encoding: the pushers cost almost nothing) to one
rtsp-server-perl that relays each as rtsp://127.0.0.1:PORT/camK over UDP. For each N, both modes read the same
N cameras, one after the other:

- serve: `python -m edgepipe serve --model DIR --source URL ... --rtsp-transport T --jsonl-dir D --api-port P
  --stats F` (one process, one batched engine);
- separate: N x `python -m edgepipe.runtime.camera --model DIR --source URL --rtsp-transport T --jsonl F --stats S`.

Each run waits until every stream has given a result (or --warmup s), lets it settle 2 s, then counts over a
window of --seconds: frames classified (JSONL lines whose arrival ``ts`` falls in the window) / frames offered
(the clip's fps x window, per stream), aggregate fps, arrival-to-result p50/p95 (``age_ms``; ``pts_age_ms``, from
the frame's presentation timestamp, where the records carry it), the summed peak RSS (VmHWM) of every process
of the run's process tree, and (serve) the engine's batch-size histogram over the window, from the difference
of two scrapes of GET /metrics. The camera side's CPU share (server + pushers) is reported too, since it runs on
the same cores. Linux only (/proc). Run it on a quiet machine: everything here shares the CPU.

Both modes run in the run's temporary folder with this interpreter, so they measure the edgepipe installed in
it (`make setup`: this checkout, editable).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from edgepipe.benchmarks.results_page import cameras_table

FPS, SIZE, KEYFRAME_S, CLIP_S = 15, "640x360", 2.0, 20
SETTLE_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ cameras

def encode_clip(folder: Path, fps: int = FPS, size: str = SIZE, keyframe_s: float = KEYFRAME_S,
                seconds: int = CLIP_S) -> Path:
    """The one clip every camera sends: H.264 baseline-like (no B-frames), a keyframe every keyframe_s."""
    out = folder / f"camera-{size}-{fps}fps.mp4"
    gop = str(int(round(fps * keyframe_s)))
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                    "-tune", "zerolatency", "-bf", "0", "-g", gop, "-keyint_min", gop, "-sc_threshold", "0",
                    str(out)], check=True)
    return out


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_udp_range(count: int) -> int:
    """An even port p with UDP p .. p+count-1 free (rtsp-server-perl gives each published stream the next pair)."""
    for _ in range(200):
        start = random.randrange(20000, 60000 - count, 2)
        socks = []
        try:
            for p in range(start, start + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("", p))          # the server listens on every address
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} free UDP ports in a row")


class Cameras:
    """rtsp-server-perl relaying N pushed copies of one clip as rtsp://127.0.0.1:PORT/cam00 ... camNN."""

    def __init__(self, clip: Path, n: int, workdir: Path):
        self.clip, self.n, self.workdir = clip, n, workdir
        self.client_port, self.source_port = _free_tcp_port(), _free_tcp_port()
        self.server, self.pushers = None, []

    @property
    def urls(self) -> list[str]:
        return [f"rtsp://127.0.0.1:{self.client_port}/cam{k:02d}" for k in range(self.n)]

    def start(self, tries: int = 3) -> "Cameras":
        """Server and pushers; tried again on other ports when a pusher is refused (its RTP ports were taken
        between our check and the server's bind: rtsp-server-perl then answers RECORD with 404)."""
        for attempt in range(tries):
            try:
                return self._start()
            except RuntimeError as exc:
                self.stop()
                if attempt == tries - 1:
                    raise SystemExit(str(exc)) from None
        return self

    def _start(self) -> "Cameras":
        self.server = subprocess.Popen(
            ["rtsp-server-perl", "--clientport", str(self.client_port), "--serverport", str(self.source_port),
             "--loglevel", "0", "--max_clients", str(4 * self.n + 16),
             # every pusher and every client session takes the next two ports; this run opens ~3N of them
             "--rtp_start_port", str(_free_udp_range(8 * self.n + 16))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        _wait_listening(self.source_port)
        for k in range(self.n):
            with open(self.workdir / f"pusher{k:02d}.log", "w") as log:
                self.pushers.append(subprocess.Popen(
                    ["ffmpeg", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip), "-c", "copy",
                     "-f", "rtsp", f"rtsp://127.0.0.1:{self.source_port}/cam{k:02d}"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log))
        time.sleep(1.0 + 0.05 * self.n)   # ANNOUNCE + RECORD before clients ask for the mounts
        dead = [k for k, p in enumerate(self.pushers) if p.poll() is not None]
        if dead or self.server.poll() is not None:
            why = (self.workdir / f"pusher{dead[0]:02d}.log").read_text()[-300:] if dead else "rtsp-server-perl exited"
            raise RuntimeError(f"camera {dead or 'server'} did not start: {why.strip()}")
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in [self.server, *self.pushers] if p is not None]

    def stop(self) -> None:
        for p in [*self.pushers, self.server]:
            _stop(p)
        self.server, self.pushers = None, []


def _listening(port: int) -> bool:
    """A TCP socket listens on ``port`` (read from /proc/net/tcp*, without connecting: every connection that
    rtsp-server-perl closes while nothing is published resets its next RTP port to 20000, its default, which
    another server on this machine may hold -- its publishers then get 404 on RECORD)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"rtsp-server-perl did not listen on {port}")


def _stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# ------------------------------------------------------------------ /proc: memory and CPU of process trees

def _proc_status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(roots: list[int]) -> list[int]:
    kids, out, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakRss(threading.Thread):
    """Samples the process trees under ``roots`` every 0.5 s; ``total()``: the sum over every process seen of its
    peak RSS (VmHWM, kept by the kernel, so a short sampling gap loses nothing but processes that live < 0.5 s)."""

    def __init__(self, roots: list[int]):
        super().__init__(daemon=True)
        self.roots, self.peak, self.done = roots, {}, threading.Event()

    def sample(self) -> None:
        for pid in tree(self.roots):
            self.peak[pid] = max(self.peak.get(pid, 0), _proc_status(pid, "VmHWM"))

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()

    def total(self) -> int:
        self.sample()
        self.done.set()
        return sum(self.peak.values())


# ------------------------------------------------------------------ results

def read_records(paths: list[Path]) -> dict[str, list[dict]]:
    """Complete JSONL lines of each file (or each *.jsonl in a folder), by stream (the record's ``stream``, else
    the file's name)."""
    by_stream: dict[str, list[dict]] = {}
    for path in [f for p in paths for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]:
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines(keepends=True):
            if line.endswith("\n") and line.startswith("{"):
                record = json.loads(line)
                if "frame" in record:   # not a summary line
                    by_stream.setdefault(str(record.get("stream", path.stem)), []).append(record)
    return by_stream


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))], 1)


def window_stats(by_stream: dict[str, list[dict]], streams: int, t0: float, t1: float, fps: float) -> dict:
    """What was classified of the frames that arrived in [t0, t1) (wall clock), over all ``streams``."""
    offered = fps * (t1 - t0)
    counts, ages, pts_ages = [], [], []
    for records in list(by_stream.values()) + [[]] * max(0, streams - len(by_stream)):
        inside = [r for r in records if t0 <= r["ts"] < t1]
        counts.append(len(inside))
        ages += [r["age_ms"] for r in inside if "age_ms" in r]
        pts_ages += [r["pts_age_ms"] for r in inside if r.get("pts_age_ms") is not None]
    return {"classified": sum(counts), "offered": round(offered * streams),
            "classified_over_offered": round(sum(counts) / (offered * streams), 3),
            "worst_stream": round(min(counts) / offered, 3) if counts else 0.0,
            "aggregate_fps": round(sum(counts) / (t1 - t0), 1),
            "age_p50_ms": percentile(ages, 50), "age_p95_ms": percentile(ages, 95),
            "pts_age_p50_ms": percentile(pts_ages, 50), "pts_age_p95_ms": percentile(pts_ages, 95)}


def scrape_batches(port: int) -> dict[str, float] | None:
    """Cumulative bucket counts of edgepipe_batch_size from GET /metrics (None when there is none)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ImportError):
        return None
    return {s.labels["le"]: s.value for fam in text_string_to_metric_families(text) if fam.name == "edgepipe_batch_size"
            for s in fam.samples if s.name.endswith("_bucket")}


def batch_histogram(before: dict | None, after: dict | None) -> dict | None:
    """Engine calls per batch-size bucket between two scrapes: {"<=1": n, "<=2": n, ...} (empty buckets left out)."""
    if not before or not after:
        return None
    edges = sorted(after, key=lambda le: float(le))
    out, below = {}, 0.0
    for le in edges:
        cumulative = after[le] - before.get(le, 0.0)
        if cumulative - below:
            out["<=" + (le if le == "+Inf" else f"{float(le):g}")] = int(cumulative - below)
        below = cumulative
    return out


# ------------------------------------------------------------------ the two modes

def measure(procs: list[subprocess.Popen], jsonl: list[Path], n: int, args, camera_pids: list[int],
            scrape=lambda: None) -> dict:
    """Warm up, count a window of args.seconds, stop the processes; the window's figures."""
    rss = PeakRss([p.pid for p in procs])
    rss.start()
    deadline = time.monotonic() + args.warmup
    while time.monotonic() < deadline and len(read_records(jsonl)) < n and all(p.poll() is None for p in procs):
        time.sleep(0.25)
    started = len(read_records(jsonl))
    time.sleep(SETTLE_S)
    before, t0 = scrape(), time.time()
    cpu0 = cpu_seconds(tree(camera_pids))
    time.sleep(args.seconds)
    t1, after = time.time(), scrape()
    camera_cpu = (cpu_seconds(tree(camera_pids)) - cpu0) / (t1 - t0)
    peak = rss.total()
    for p in procs:
        _stop(p, signal.SIGINT, timeout=30)
    failed = [p.returncode for p in procs if p.returncode not in (0, -signal.SIGINT)]
    result = window_stats(read_records(jsonl), n, t0, t1, args.fps)
    result.update({"streams_started": started, "peak_rss_mb": round(peak / 2**20), "camera_cpu": round(camera_cpu, 2),
                   "batch_histogram": batch_histogram(before, after), "exit_codes_not_ok": failed})
    return result


def run_serve(args, urls: list[str], folder: Path, camera_pids: list[int]) -> dict:
    port = _free_tcp_port()
    sources = [a for url in urls for a in ("--source", url)]
    cmd = [sys.executable, "-m", "edgepipe", "serve", "--model", args.model, *sources, "--rtsp-transport", args.transport,
           "--jsonl-dir", str(folder / "jsonl"), "--api-port", str(port), "--stats", str(folder / "stats.json"),
           *shlex.split(args.serve_args)]
    with open(folder / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=folder)
    result = measure([proc], [folder / "jsonl"], len(urls), args, camera_pids, scrape=lambda: scrape_batches(port))
    log_text = (folder / "serve.log").read_text()
    result["batch_choice"] = next((line for line in log_text.splitlines() if line.startswith("serve: batch")), None)
    result["log_tail"] = log_text[-600:] if result["exit_codes_not_ok"] else None
    return result


def run_separate(args, urls: list[str], folder: Path, camera_pids: list[int]) -> dict:
    procs, jsonl = [], []
    for k, url in enumerate(urls):
        jsonl.append(folder / f"cam{k:02d}.jsonl")
        cmd = [sys.executable, "-m", "edgepipe.runtime.camera", "--model", args.model, "--source", url, "--rtsp-transport", args.transport,
               "--jsonl", str(jsonl[-1]), "--stats", str(folder / f"cam{k:02d}.stats.json"), *shlex.split(args.camera_args)]
        with open(folder / f"cam{k:02d}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=folder))
    result = measure(procs, jsonl, len(urls), args, camera_pids)
    result["log_tail"] = (folder / "cam00.log").read_text()[-600:] if result["exit_codes_not_ok"] else None
    return result


MODES = {"serve": run_serve, "separate": run_separate}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.lower().startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="artifact folder (e.g. from `edgepipe run recipes/default.yaml`)")
    p.add_argument("--cameras", default="1,4,8,16,24", help="comma-separated camera counts")
    p.add_argument("--seconds", type=float, default=40.0, help="measured window per run")
    p.add_argument("--modes", default="serve,separate", help="serve, separate or both (in this order per N)")
    p.add_argument("--transport", default="udp", choices=["udp", "tcp", "auto"],
                   help="--rtsp-transport given to both (rtsp-server-perl serves UDP only)")
    p.add_argument("--warmup", type=float, default=60.0, help="longest wait for every stream's first result")
    p.add_argument("--serve-args", default="", help="more arguments for edgepipe serve (quoted)")
    p.add_argument("--camera-args", default="", help="more arguments for each camera.py (quoted)")
    p.add_argument("--out", help="write the results here (JSON)")
    args = p.parse_args(argv)
    args.fps, args.model = FPS, str(Path(args.model).resolve())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes {','.join(unknown)}: choose from {', '.join(MODES)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="many-cameras-") as tmp:
        work = Path(tmp)
        clip = encode_clip(work)
        for n in [int(x) for x in args.cameras.split(",") if x.strip()]:
            cams = Cameras(clip, n, work).start()
            try:
                for mode in modes:
                    folder = work / f"{mode}-{n}"
                    folder.mkdir()
                    r = {"cameras": n, "mode": mode, **MODES[mode](args, cams.urls, folder, cams.pids())}
                    results.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                cams.stop()
    report = {"machine": machine(), "model": args.model, "seconds": args.seconds, "transport": args.transport,
              "camera": f"H.264 {SIZE} {FPS} fps, keyframe every {KEYFRAME_S:g} s, ffmpeg -c copy to rtsp-server-perl",
              "results": results}
    print(cameras_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
