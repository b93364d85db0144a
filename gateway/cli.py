"""`canary-gateway`: serve models, or run the demo."""

from __future__ import annotations

import argparse
import logging
import resource
import sys

from gateway import admin_cli, feedback_cli, rollout_cli
from gateway import config as config_module
from gateway.errors import ConfigError
from gateway.ood import commands as ood_commands
from gateway.requestlog import commands as log_commands


def _serve(args: argparse.Namespace) -> int:
    from gateway import eventloop
    from gateway.server import serve
    from gateway.supervisor import Supervisor

    config = config_module.with_overrides(
        config_module.load(args.config),
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        repository_path=args.model_repository,
        log_dir=args.log_dir,
        metrics_port=args.metrics_port,
        workers=args.workers,
    )
    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.worker_count > 1:
        return Supervisor(config, config.worker_count, use_uvloop=not args.asyncio_loop).run()
    eventloop.run(serve(config), use_uvloop=not args.asyncio_loop)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.directory, args.port, args.requests, args.state_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canary-gateway", description="gRPC gateway for ONNX models")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over the Open Inference Protocol")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--model-repository", help="directory of <model>/<version>/model.onnx")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8001; 0 picks a free port)")
    serve.add_argument("--state-dir", help="where the gateway keeps its state (default ./gateway-state)")
    serve.add_argument("--log-dir", help="the request log directory (default <state-dir>/log)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics")
    serve.add_argument(
        "--workers", type=int, help="serving processes sharing the port (default: one per core; 1: no supervisor)"
    )
    serve.add_argument("--asyncio-loop", action="store_true", help="use asyncio's event loop instead of uvloop")
    serve.set_defaults(func=_serve)

    demo = commands.add_parser("demo", help="build two demo model versions, serve them, send traffic")
    demo.add_argument("--directory", default="demo-models", help="where to write the demo repository")
    demo.add_argument("--port", type=int, default=8001)
    demo.add_argument("--requests", type=int, default=200)
    demo.add_argument("--state-dir", default="gateway-state", help="the gateway's state (request log) directory")
    demo.set_defaults(func=_demo)

    log_commands.add_parser(commands)
    ood_commands.add_parser(commands)
    admin_cli.add_parsers(commands)
    rollout_cli.add_parser(commands)
    feedback_cli.add_parser(commands)
    return parser


def _allow_all_open_files() -> None:
    """Raise the soft limit on open files to the hard one. Every process that reads the request log
    (each worker, its feedback ingest process, `log` commands) keeps two descriptors per segment open,
    and with hourly segments kept for weeks that passes the common soft limit of 1024, which would then
    refuse gRPC connections too. Children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:  # infinity: more than the kernel allows a process
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # a sandbox that forbids it: the soft limit stays
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _allow_all_open_files()
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"canary-gateway: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
