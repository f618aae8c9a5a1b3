"""``python -m testbed.vcenter serve --config DIR/vcenter.json [--daemon]``: run one vCenter service.

The service listens with HTTPS on the configured address (inside the
vCenter's namespace). With --daemon it detaches once it accepts connections
and prints its PID. On start it resolves the tasks a previous run left
running (``VCenter.recover``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path


async def _serve(cfg_path: Path, ready: Callable[[], None] | None) -> None:
    import uvicorn

    from testbed.vcenter.api import create_app
    from testbed.vcenter.config import VcenterConfig
    from testbed.vcenter.service import VCenter

    cfg = VcenterConfig.load(cfg_path)
    vc = VCenter(cfg)
    config = uvicorn.Config(create_app(vc), host=cfg.address, port=cfg.port, ssl_certfile=str(cfg.cert),
                            ssl_keyfile=str(cfg.key), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        cfg.pidfile.write_text(f"{os.getpid()}\n")
        logging.getLogger("testbed.vcenter").info("vCenter %s listening on %s:%d", cfg.name, cfg.address, cfg.port)
        if ready is not None:
            ready()

    t = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        t.cancel()
        cfg.pidfile.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.vcenter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the vCenter service")
    s.add_argument("--config", required=True, type=Path)
    s.add_argument("--daemon", action="store_true", help="detach once listening; print the PID")
    args = p.parse_args(argv)
    log_path = args.config.parent / "vcenter.log"
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    if not args.daemon:
        logging.basicConfig(level=logging.INFO, format=fmt)
        asyncio.run(_serve(args.config, None))
        return 0
    from testbed.daemon import detach
    ready = detach(log_path, "the vCenter service")
    logging.basicConfig(level=logging.INFO, format=fmt)
    asyncio.run(_serve(args.config, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
