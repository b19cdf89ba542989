"""Serving beyond loopback: without a bearer token the app refuses to start (real Serve, node IP)."""

from __future__ import annotations

import pytest

from tests.conftest import free_port
from tests.serve_helpers import SEMANTIC, save_checkpoint


@pytest.mark.slow
def test_a_proxy_beyond_loopback_without_a_token_refuses_to_start(ray_cluster, tmp_path):
    import ray
    from ray import serve

    from monitoring.serving import deploy
    from segloop.settings import is_loopback
    from serve_app.config import AppArgs

    host = ray.util.get_node_ip_address()
    if is_loopback(host):
        pytest.skip(f"this machine has no address beyond loopback ({host})")
    ckpt = save_checkpoint(tmp_path / "m.pt", SEMANTIC)
    args = AppArgs(model={"model_uri": f"checkpoint:{ckpt}", "poll_interval_s": 0}, capture=None, model_num_replicas=1)
    try:
        with pytest.raises(RuntimeError) as info:
            deploy(args, "segloop-exposed", "/", http_options={"host": host, "port": free_port()}, timeout_s=120)
        assert "beyond loopback" in str(info.value) and "SEGLOOP_TOKEN" in str(info.value), str(info.value)[-800:]
    finally:
        serve.shutdown()
