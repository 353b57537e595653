"""`python -m simulator --host 127.0.0.1 --port 8400 [--faults JSON]`"""

from __future__ import annotations

import argparse
import json

from simulator.core import Simulator, SimulatorConfig
from simulator.server import base_url, bind_socket, build_server

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="Kernelflow's LLM-cloud simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400, help="0 picks a free port")
    parser.add_argument(
        "--faults", default="", help="fault rules as a JSON list (added to KERNELFLOW_SIM_FAULTS)"
    )
    args = parser.parse_args(argv)

    config = SimulatorConfig.from_env()
    if args.faults:
        rules = json.loads(args.faults)
        config.faults.extend([rules] if isinstance(rules, dict) else rules)
    sock = bind_socket(args.host, args.port)
    print(f"Kernelflow simulator listening on {base_url(sock)}", flush=True)
    build_server(Simulator(config)).run(sockets=[sock])


if __name__ == "__main__":
    main()
