"""Connecting to Ray: a local runtime by default, or a running cluster with `address`.

`connect(address)` is called by `lorakit sweep --backend ray` and `lorakit serve --replicas N`.
A process that is already connected (a test's shared runtime, a notebook) keeps its connection;
otherwise `address=None` starts a local runtime on this machine, and `"auto"` or `HOST:PORT`
joins the cluster started with `ray start --head` (docs/cluster.md). Ray's usage statistics are
off unless the user turned them on.
"""

from __future__ import annotations

import os

from lorakit.errors import LorakitError

RAY_EXTRA = "pip install 'lorakit[ray]' (Ray Tune and Ray Serve)"


def require_ray(what: str):
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LorakitError(f"{what} needs Ray: {RAY_EXTRA}") from None
    return ray


def connect(address: str | None = None, what: str = "this command", num_cpus: int | None = None):
    """Connect this process to Ray (once) and return the `ray` module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require_ray(what)
    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise LorakitError(f"--address {address}: cannot join a Ray cluster there ({e}); start one "
                           "with `ray start --head` (docs/cluster.md)") from None
    return ray
