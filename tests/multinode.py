"""The simulated multi-node cluster (``segloop.simcluster``) as the tests use it.

A ``num_cpus=0`` head and a second node in its own mount namespace that sees none of the
driver's files: the test's base directory, pytest's temp root and this machine's segloop
node cache are hidden from it. S3 is moto's server in this process; MLflow a real server.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from segloop import simcluster
from segloop.simcluster import BIN, REPO, SimCluster  # noqa: F401 - re-exported for the tests
from tests.s3server import S3Server, unique_bucket


def start_cluster(pytest_root: Path) -> SimCluster:
    from segloop.settings import node_cache_dir

    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="smn-", dir="/tmp"))
    try:
        simcluster.check_host([base, pytest_root, cache])
    except simcluster.Unavailable as err:
        pytest.skip(str(err))
    s3 = S3Server().start()
    return simcluster.start(base, s3, unique_bucket("multinode"), hidden=[pytest_root, cache])


stop = simcluster.stop
