"""`modeldeploy serve`: serve one model from the shared cache over OpenAI-compatible and KServe v2 endpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from modeldeploy.pull.cli import positive, repo_id
from modeldeploy.serve import device as devices
from modeldeploy.serve.loading import TASKS

log = logging.getLogger("modeldeploy.serve")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model from the shared cache", description=__doc__)
    p.add_argument("--model", required=True, type=repo_id, help="ORG/NAME, as pulled")
    p.add_argument("--revision", required=True, help="the commit (or a ref the cache knows) to serve")
    p.add_argument("--cache-dir", required=True, type=Path)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--served-model-name", help="the name clients use (default: --model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quantization", choices=devices.QUANTIZATIONS, default="auto",
                   help="auto: fp16 on CUDA; on CPU int8-dynamic where it measures faster than fp32 at start-up "
                        "and agrees with it, else none (fp32)")
    p.add_argument("--max-batch-size", type=positive(int), default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="how long an idle model waits to fill a batch")
    p.add_argument("--max-queue", type=positive(int), default=1024, help="queued items before answering 503")
    p.add_argument("--max-inputs", type=positive(int), default=1024,
                   help="texts per request; more answer 413 (default: %(default)s)")
    p.add_argument("--max-new-tokens-limit", type=positive(int), default=4096,
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-body-mb", type=positive(float), default=4.0,
                   help="request body size in MiB; larger answer 413 (default: %(default)s)")
    p.add_argument("--request-timeout", type=positive(float), default=120.0,
                   help="seconds a request may take, queue included; later answer 504 (default: %(default)s)")
    p.add_argument("--threads", type=positive(int), help="torch threads (default: the container's CPU limit)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickle weights when there are no safetensors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except devices.StartupError as error:
        log.error("cannot start: %s", error)
        try:
            Path("/dev/termination-log").write_text(f"cannot start: {error}"[:4000])
        except OSError:
            pass
        return 1


async def serve(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the other subcommands (the sidecar above all) must stay small.
    import torch
    from aiohttp import web

    from modeldeploy.serve.app import ServerState, build_app
    from modeldeploy.serve.batching import new_model_thread
    from modeldeploy.serve.engine import ENGINES, BatchingOptions
    from modeldeploy.serve.loading import LoadOptions, load
    from modeldeploy.serve.metrics import RuntimeMetrics
    from modeldeploy.serve.requests import Limits

    device = devices.choose_device(args.device)
    quantization = devices.resolve_quantization(args.quantization, device)
    threads = devices.cpu_threads(args.threads)
    torch.set_num_threads(threads)
    name = args.served_model_name or args.model
    limits = Limits(max_inputs=args.max_inputs, max_new_tokens=args.max_new_tokens_limit,
                    max_body_bytes=int(args.max_body_mb * 2**20), request_timeout=args.request_timeout)
    state = ServerState(name=name, metrics=RuntimeMetrics(name, quantization), limits=limits)
    if device == "cuda":
        from modeldeploy.serve.gpu import NvmlCollector

        state.metrics.registry.register(NvmlCollector(name))

    # handler_cancellation: a request whose client went away is cancelled (its generation stops), not finished.
    runner = web.AppRunner(build_app(state), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("listening on %s:%d (%s on %s, %s, %d threads); loading %s@%s", args.host, args.port, args.task,
             device, quantization, threads, args.model, args.revision)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        model_thread = new_model_thread()
        loaded = await asyncio.get_running_loop().run_in_executor(model_thread, load, LoadOptions(
            model_id=args.model, revision=args.revision, cache_dir=args.cache_dir, task=args.task, device=device,
            quantization=quantization, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            requested=args.quantization))
        state.metrics.record_precision(loaded.precision)
        engine = ENGINES[args.task](loaded, name, BatchingOptions(args.max_batch_size, args.max_delay_ms,
                                                                   args.max_queue), state.metrics, model_thread)
        engine.batcher.start()
        await engine.batcher.run_alone(engine.warm_up)
        state.engine = engine
        state.metrics.load_seconds.labels(name).set(loaded.load_seconds)
        state.metrics.ready.labels(name).set(1)
        state.ready = True
        log.info("ready: %s@%s", args.model, loaded.commit)
        await stop.wait()
        log.info("shutting down")
        await engine.stop()
    finally:
        await runner.cleanup()
    return 0
