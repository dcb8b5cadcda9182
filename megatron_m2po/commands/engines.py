"""`m2po engines --model HF_DIR --servers N [--tp T] [--router]`: serve a node's engines until SIGINT / SIGTERM.

Starts the servers (`rollout/engines/sglang_launcher.py`: SGLang, or `--backend local` for CPU engines behind
the same HTTP API), prints their URLs (or the router's) on one line, keeps them up (`rollout/engines/
supervisor.py`: a server that exits or stops answering is restarted, with backoff and a budget; exit 1 when
every server is past its budget), and stops them on the way out. The keys
come from environment variables (`--api-key-env`, default M2PO_API_KEY), so they stay out of configs and shell
history; a host other than loopback without a key is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal

from megatron_m2po.rollout.engines.local_server import is_loopback
from megatron_m2po.rollout.engines.sglang_launcher import EngineLauncher
from megatron_m2po.rollout.engines.supervisor import EngineSupervisor, RestartPolicy

SUPERVISION_HELP = {
    "check_interval": "seconds between health probes of each server",
    "health_timeout": "seconds a probe (GET /health) may take before it counts as failed",
    "unhealthy_after": "failed probes in a row before a live (hung) server is killed and restarted",
    "backoff": "seconds before a failed server's first restart; doubles with each restart within the window",
    "backoff_max": "longest wait before a restart",
    "max_restarts": "restarts of one server within --restart-window before it is left down (0: never restart)",
    "restart_window": "seconds over which --max-restarts counts (and the backoff doubles)",
    "start_timeout": "seconds a restarted server has to answer /health",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model dir served by every server")
    parser.add_argument("--servers", type=int, default=1, help="servers on this node")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel GPUs per server")
    parser.add_argument(
        "--backend",
        choices=["sglang", "local"],
        default="sglang",
        help="sglang: sglang.launch_server; local: megatron_m2po's LocalEngine (CPU)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=3600.0,
        help="seconds the trainer's client waits for one /generate; the router's bound is set above it",
    )
    parser.add_argument("--host", default="127.0.0.1", help="beyond loopback needs a key (--api-key-env)")
    parser.add_argument(
        "--api-key-env",
        default="M2PO_API_KEY",
        help="environment variable holding the servers' --api-key (unset: none on loopback, refused otherwise)",
    )
    parser.add_argument(
        "--admin-api-key-env",
        default="M2PO_ADMIN_API_KEY",
        help="environment variable holding the servers' --admin-api-key for control routes (optional)",
    )
    parser.add_argument("--base-port", type=int, default=30000, help="server i listens on base-port + i")
    parser.add_argument("--router", action="store_true", help="start sglang-router in front")
    parser.add_argument("--router-port", type=int, default=29000)
    parser.add_argument("--log-dir", default=None, help="one <name>.log per server")
    parser.add_argument("--server-args", default="", help="extra flags for every server, one quoted string")
    parser.add_argument(
        "--routed-experts",
        choices=["auto", "on", "off"],
        default="auto",
        help="servers return the experts each token was routed to (--enable-return-routed-experts, for the "
        "trainer's routing replay); auto = on for MoE models",
    )
    supervision = parser.add_argument_group("supervision (docs/rollout.md, 'Failure model')")
    defaults = RestartPolicy()
    for name, text in SUPERVISION_HELP.items():
        default = getattr(defaults, name)
        supervision.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(default),
            default=default,
            help=f"{text} (default {default})",
        )


def run(args: argparse.Namespace) -> int:
    """Start the servers, print their URLs on one line, serve until SIGINT / SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = RestartPolicy(**{name: getattr(args, name) for name in SUPERVISION_HELP})
    except ValueError as e:
        raise SystemExit(f"m2po engines: {e}") from None
    if not os.environ.get(args.api_key_env) and not is_loopback(args.host):
        raise SystemExit(
            f"m2po engines: refusing to serve on {args.host} without a key: set {args.api_key_env} "
            "(the same value the trainer's rollout.api_key_env names), or use --host 127.0.0.1"
        )
    launcher = EngineLauncher(
        args.model,
        servers=args.servers,
        tp=args.tp,
        backend=args.backend,
        host=args.host,
        ports=[args.base_port + i for i in range(args.servers)],
        router=args.router,
        router_port=args.router_port,
        request_timeout=args.request_timeout,
        extra_args=shlex.split(args.server_args),
        log_dir=args.log_dir,
        api_key=os.environ.get(args.api_key_env) or None,
        admin_api_key=os.environ.get(args.admin_api_key_env) or None,
        routed_experts={"auto": None, "on": True, "off": False}[args.routed_experts],
    )

    def _exit(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)  # SIGTERM, like Ctrl-C, stops the servers on the way out
    try:
        launcher.start()
        print(" ".join([launcher.router_url] if args.router else launcher.urls), flush=True)
        EngineSupervisor(launcher, policy).run()
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        logging.getLogger("m2po.engines").error("%s", e)
        return 1
    finally:
        launcher.stop()
    return 0
