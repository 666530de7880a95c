"""A Hydra app with dynalign's resolvers whose jobs only wait a second: ``-m`` sweeps of it show
where each job of a sweep lands (``hydra.sweep.dir=...${run_stamp:}``)."""

from __future__ import annotations

import time

import hydra

from dynalign.runtime import register_resolvers

register_resolvers()


@hydra.main(config_path=None, config_name=None, version_base="1.3")
def main(cfg) -> None:
    time.sleep(1.1)  # the next job starts in a later second


if __name__ == "__main__":
    main()
