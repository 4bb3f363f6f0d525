"""python -m worker.emulator --vhost-socket PATH --uds PATH [--guest-cid N]: the vhost-user-vsock back-end."""

from __future__ import annotations

import argparse
import logging
import sys

from worker.emulator.daemon import Backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.emulator",
        description="vhost-user-vsock back-end: serves QEMU's vhost-user-vsock device (QEMU connects to "
                    "--vhost-socket) and maps the guest's vsock to host Unix sockets: a guest connection to "
                    "the host's port P reaches UDS_P; a host connection to UDS that sends 'CONNECT P\\n' "
                    "reaches the guest's port P.")
    parser.add_argument("--vhost-socket", required=True, metavar="PATH", help="where QEMU connects (created)")
    parser.add_argument("--uds", required=True, metavar="PATH", help="host socket base path (created)")
    parser.add_argument("--guest-cid", type=int, default=4, metavar="N", help="the guest's CID, >= 3 (default 4)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every stream")
    parser.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    args = parser.parse_args(argv)
    if not 3 <= args.guest_cid <= 0xFFFFFFFE:
        parser.error("--guest-cid must be at least 3 (0-2 are reserved) and fit in 32 bits")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="nitroconv-vsock: %(levelname)s %(message)s")
    backend = Backend(args.vhost_socket, args.uds, args.guest_cid)
    try:
        backend.start()
    except OSError as exc:
        logging.getLogger("nitroconv.vsock").error("vsock_listen_failed: %s", exc)
        return 1
    return backend.run()


if __name__ == "__main__":
    sys.exit(main())
