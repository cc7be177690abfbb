"""``nst-lightning serve``: its options, and uvicorn started on the app (one line for what stops it)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import socket
import sys
from pathlib import Path

from nst_lightning.cli.oneshot import OneLineParser
from nst_lightning.errors import NSTError

DEFAULT_DATA = "nst-serve"


def parser() -> argparse.ArgumentParser:
    """The options of ``nst-lightning serve``."""
    p = OneLineParser(
        prog="nst-lightning serve",
        description="A web page and JSON API for style transfer jobs (see the README's Web app section).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on, 0 to 65535 (8000)")
    p.add_argument(
        "--data", default=DEFAULT_DATA, help=f"folder of the jobs, their files and the job store ({DEFAULT_DATA})"
    )
    p.add_argument("--token", help="require this token on every API call (set it when other machines can connect)")
    p.add_argument("--max-upload-mb", type=megabytes, default=25.0, help="largest image file taken, in MB (25)")
    p.add_argument("--weights-dir", help="folder of weight files offered to jobs (<data>/weights)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the server answers to besides IP addresses and localhost (repeatable; '*': any)",
    )
    return p


def port_number(text: str) -> int:
    """``--port``: a whole number from 0 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 0 to 65535")
    return value


def megabytes(text: str) -> float:
    """``--max-upload-mb``: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give a number of MB above 0, such as 25")
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _own_address(family: int) -> str | None:
    """This machine's address on its network (the one a default route leaves by; no packet is sent), if any."""
    probe = ("10.255.255.255", 1) if family == socket.AF_INET else ("fd00::1", 1)
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(probe)
        address = sock.getsockname()[0]
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def addresses(host: str, port: int) -> list[str]:
    """The addresses to open for a server listening on ``host``: itself, or, for a wildcard (``0.0.0.0``, ``::``),
    which no browser can open, ``localhost`` and this machine's address on its network (an IP address: the server
    answers to those whatever ``--allowed-host`` says)."""
    if not _is_unspecified(host):
        return [f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"]
    shown = [f"http://localhost:{port}/"]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    own = _own_address(family)
    if own:
        shown.append(f"http://[{own}]:{port}/" if ":" in own else f"http://{own}:{port}/")
    return shown


def serve_main(argv: list[str]) -> None:
    """Runs the server until Ctrl-C; running jobs are stopped with a checkpoint and resume at the next start."""
    args = parser().parse_args(argv)
    try:
        import uvicorn

        from nst_lightning.serve.app import create_app
        from nst_lightning.serve.guards import quiet_protocol_faults
    except ImportError as err:
        sys.stderr.write(f"nst-lightning: error: the web app needs {err.name}: pip install 'nst-lightning[web]'\n")
        raise SystemExit(1) from None
    if not _is_loopback(args.host) and not args.token:
        sys.stderr.write(
            f"nst-lightning: warning: listening on {args.host} without --token: anyone who can reach this port "
            "can run jobs and see every image\n"
        )
    data = Path(args.data)
    try:
        data.mkdir(parents=True, exist_ok=True)
        app = create_app(
            data,
            token=args.token,
            max_upload_mb=args.max_upload_mb,
            weights_dir=args.weights_dir,
            allowed_hosts=[args.host, *args.allowed_host],
        )
    except OSError as err:
        sys.stderr.write(f"nst-lightning: error: cannot use --data {data}: {err.strerror or err}\n")
        raise SystemExit(1) from None
    except NSTError as err:  # a store that is damaged or not ours, a folder another server holds
        sys.stderr.write(f"nst-lightning: error: {err}\n")
        raise SystemExit(1) from None
    for line in app.state.weights_warnings:
        sys.stderr.write(f"nst-lightning: warning: {line}\n")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as err:
        listener.close()
        sys.stderr.write(
            f"nst-lightning: error: cannot listen on {args.host}:{args.port} ({err.strerror or err}): "
            "choose another --port (or --host)\n"
        )
        raise SystemExit(1) from None
    query = f"?token={args.token}" if args.token else ""
    first, *others = addresses(args.host, args.port)
    app.state.store.lock.announce(first)  # named to a second server on this folder
    elsewhere = f"; from other machines {', '.join(url + query for url in others)}" if others else ""
    print(f"nst-lightning: serving on {first}{query} (jobs in {data.resolve()}{elsewhere}; Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    quiet_protocol_faults(server, logging.getLogger("uvicorn.error").warning)  # one line, as uvicorn's own warnings
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the Ctrl-C again once it has shut down
        server.run(sockets=[listener])
