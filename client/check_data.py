"""Check a hospital's data before it joins: read every file as training would and print what was found.

    python -m client.check_data deploy/sites/class-folders.yaml [-c "image-size=64 labels=lesion"]

Exits 0 when the site is ready to train, 1 when something would stop it (each reason printed), 2 on a bad command.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common.cli import program  # noqa: E402
from common.config import parse_overrides, parse_run_config, project_settings  # noqa: E402
from common.data_check import check_site  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.site_file import load_site_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command line: load the site file and the run settings, run the check, print the report."""
    parser = argparse.ArgumentParser(prog=program("python -m client.check_data"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", help="the site's YAML file")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="space-separated key=value run settings (the run's labels, image size, channels)")
    args = parser.parse_args(argv)
    try:
        cfg = parse_run_config({**project_settings(), **parse_overrides(args.run_config)})
        site = load_site_config(args.site)
    except ConfigError as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    report = check_site(site, cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(report.lines))
    for warning in report.warnings:
        print(f"WARNING: {warning}")
    if report.blocking:
        print("NOT READY: " + "; ".join(report.blocking))
        return 1
    print(f"READY: site {site.name!r} can join a run with labels {', '.join(cfg.labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
