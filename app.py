"""Start PixelHDM Studio: parse the command line, build the page, serve it.

The studio listens on 127.0.0.1 unless told otherwise; listening on any other address
gives every machine that can reach it the power to read the workspace and start jobs, so
that needs --auth.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from pathlib import Path


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MAX_UPLOAD_MB = 200


def serving_rules(workspace: Path, allow_dirs=(), max_upload_mb: int = MAX_UPLOAD_MB) -> dict:
    """What the server may hand out and take in: files of the workspace (and the allowed
    folders) only, and uploads up to `max_upload_mb` each (larger ones are refused with
    HTTP 413 before they reach the disk)."""
    allowed = [str(Path(workspace).resolve())] + [str(Path(d).expanduser().resolve())
                                                  for d in allow_dirs]
    return {"allowed_paths": allowed, "max_file_size": max_upload_mb * 1024 * 1024,
            "prevent_thread_lock": True, "quiet": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; bad flags exit with code 2 and a message saying what to do."""
    p = argparse.ArgumentParser(
        prog="app.py",
        description="PixelHDM Studio: train a pixel-space text-to-image model and generate "
                    "images from a browser tab.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any other "
                        "address requires --auth)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--workspace", type=Path, default=Path("workspace"),
                   help="folder for datasets, runs, outputs and models (default ./workspace)")
    p.add_argument("--auth", metavar="USER:PASS",
                   help="require this user name and password to open the studio")
    p.add_argument("--allow-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="also let the browser read files from DIR (repeatable); by default "
                        "only the workspace is served")
    p.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_MB, metavar="MB",
                   help=f"largest file the browser may upload: a start image, a PNG to recall, "
                        f"dataset images (default {MAX_UPLOAD_MB})")
    p.add_argument("--inbrowser", action="store_true",
                   help="open the studio in the default browser once it is ready")
    args = p.parse_args(argv)

    if not 1 <= args.max_upload_mb <= 4096:
        p.error(f"--max-upload-mb {args.max_upload_mb}: allowed is 1 to 4096")
    if not 1 <= args.port <= 65535:
        p.error(f"--port {args.port}: allowed is 1 to 65535")
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (user and sep and password):
            p.error("--auth must be USER:PASS with a non-empty user name and password")
    if not is_loopback(args.host) and args.auth is None:
        p.error(f"refusing to listen on {args.host} without --auth: other machines could "
                f"then use the studio. Add --auth USER:PASS, or leave out --host to stay on "
                f"127.0.0.1.")
    for d in args.allow_dir:
        if not d.expanduser().is_dir():
            p.error(f"--allow-dir {d}: no such folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workspace = args.workspace.expanduser().resolve()
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"app.py: cannot create the workspace {workspace} ({e.strerror}); choose another "
              f"folder with --workspace DIR", file=sys.stderr)
        return 1

    # Imported after the flags are checked: gradio takes seconds to import, and --help or a
    # flag error should answer at once.
    from studio.ui import build_ui

    demo = build_ui(workspace, [d.expanduser().resolve() for d in args.allow_dir])
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    # Ctrl+C, `kill` or a service manager's stop: noted by the handler, acted on below, so
    # that the server closes in order (which deletes its cached copies) wherever the
    # signal lands; a second one stops at once
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
    previous = {sig: signal.signal(sig, on_signal)   # given back when main returns
                for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if sig is not None}
    try:
        return _serve(demo, args, workspace, auth, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(demo, args, workspace: Path, auth, stop: threading.Event) -> int:
    """Launch the studio and serve it until `stop` is set."""
    try:
        _, url, _ = demo.launch(server_name=args.host, server_port=args.port, auth=auth,
                                inbrowser=args.inbrowser,
                                **serving_rules(workspace, args.allow_dir, args.max_upload_mb))
    except OSError:
        # gradio reports every bind failure as one OSError about the port range
        print(f"app.py: cannot listen on {args.host}:{args.port}: the port is in use or the "
              f"address is not one of this machine's. If the studio is already running, open "
              f"it in the browser; otherwise choose another port, e.g. --port {args.port + 1}",
              file=sys.stderr)
        return 1
    print(f"PixelHDM Studio is running at {url}  (workspace: {workspace}; Ctrl+C stops it)",
          flush=True)
    try:
        while not stop.wait(0.2) and demo.is_running:
            pass
    finally:
        print("Stopping: closing the server", flush=True)
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
