"""The services as one runnable file: a zipapp of this package.

Endpoints and the balancer are installed from it, and the balancer serves it to workers
(``GET /bundle``), so a worker always runs the balancer's own version of the code and needs
nothing from a public code host. The archive is deterministic (sorted entries, fixed
timestamps): the same code gives the same bytes, so installing it again changes nothing.

    python3 -m dynamic_workload bundle --output dynamic_workload.pyz
    python3 dynamic_workload.pyz worker --worker-id i-0123...
"""

import argparse
import io
import os
import sys
import zipfile

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MAIN = b"import sys\nfrom dynamic_workload.__main__ import main\nsys.exit(main())\n"
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def running_archive():
    """The zipapp this code runs from, or None when it runs from a directory."""
    path = os.path.dirname(PACKAGE_DIR)
    return path if zipfile.is_zipfile(path) else None


def build():
    """The bundle's bytes."""
    archive = running_archive()
    if archive:
        with open(archive, "rb") as running:
            return running.read()
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr(zipfile.ZipInfo("__main__.py", FIXED_TIME), MAIN)
        for folder, dirs, files in os.walk(PACKAGE_DIR):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                arcname = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))
                info = zipfile.ZipInfo(arcname, FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with open(path, "rb") as source:
                    bundle.writestr(info, source.read())
    return buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dynamic_workload bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="where to write the .pyz file ('-' for stdout)")
    args = parser.parse_args(argv)
    data = build()
    if args.output == "-":
        sys.stdout.buffer.write(data)
        return 0
    current = None
    if os.path.exists(args.output):
        with open(args.output, "rb") as existing:
            current = existing.read()
    if current == data:
        print(f"unchanged: {args.output}")
        return 0
    with open(args.output + ".tmp", "wb") as output:
        output.write(data)
    os.chmod(args.output + ".tmp", 0o755)
    os.replace(args.output + ".tmp", args.output)
    print(f"written: {args.output} ({len(data)} bytes)")
    return 0
