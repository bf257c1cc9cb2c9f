"""What precision `auto` costs at start-up and what it picks, for all-MiniLM-L6-v2 on this machine's CPU: the
server's own loading path (`modeldeploy.serve.loading.load`) with --quantization none, int8-dynamic and auto, taking
turns round after round so that the machine's drift falls on all three; and auto once more with torch's fbgemm
hidden, as on a loong64 or arm64 build, where int8 runs the reference `_int_mm` loop (on a CPU without
AVX512-VNNI, such as this one).

Prints, per variant, the median load time; for auto, the decision, its reason, the measured int8 speed-up of the
linear layers and the agreement, and the decision's own time (timing the layers; where int8 wins also the
calibration, which an explicit int8-dynamic pays as well, and the agreement check).

    .venv/bin/python bench/precision_bench.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.models import MINILM, pull_minilm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from modeldeploy.serve import quantize
    from modeldeploy.serve.loading import LoadOptions, load

    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    commit = pull_minilm(cache)

    def loaded(quantization: str):
        return load(LoadOptions(model_id=MINILM, revision=commit, cache_dir=cache, task="feature-extraction",
                                device="cpu", quantization=quantization, requested=quantization))

    loaded("none")      # the first load warms the file cache and torch
    seconds: dict[str, list[float]] = {"none": [], "int8-dynamic": [], "auto": []}
    choices = []
    for _ in range(args.rounds):
        for quantization in seconds:
            model = loaded(quantization)
            seconds[quantization].append(model.load_seconds)
            if quantization == "auto":
                choices.append(model.precision)
    fbgemm_available = quantize.fbgemm_available
    quantize.fbgemm_available = lambda: False
    try:
        without_fbgemm = [loaded("auto").precision for _ in range(args.rounds)]
    finally:
        quantize.fbgemm_available = fbgemm_available

    print(f"all-MiniLM-L6-v2, {args.threads} threads, {args.rounds} rounds; CPU int8 kernels: "
          f"fbgemm={fbgemm_available()}, AVX512-VNNI={quantize.int_mm_is_fast()}")
    for quantization, values in seconds.items():
        print(f"  load --quantization {quantization:13s} median {statistics.median(values):5.2f} s  "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"  auto, extra start-up over none: {statistics.median(seconds['auto']) - statistics.median(seconds['none']):+.2f} s; "
          f"over int8-dynamic: {statistics.median(seconds['auto']) - statistics.median(seconds['int8-dynamic']):+.2f} s")
    for label, runs in (("auto with fbgemm", choices), ("auto without fbgemm (reference _int_mm)", without_fbgemm)):
        print(f"  {label}:")
        for choice in runs:
            print(f"    {choice.describe()}")


if __name__ == "__main__":
    main()
