"""The engine adapter against a real engine: call counts, kept-alive connections, errors."""

from __future__ import annotations

import docker
import pytest

from gcd.engine import DockerEngine
from gcd.errors import EngineUnavailable
from tests.dockerd import PrivateEngine
from tests.images import Layer, Spec, load


def test_warm_snapshots_cost_three_calls_and_a_retag_one_inspect(
    dockerd: PrivateEngine, client: docker.APIClient
) -> None:
    ids = load(client, [Spec([f"a:{n}"], [Layer(f"a{n}")]) for n in range(20)])
    engine = DockerEngine(dockerd.url, 30)
    _, learned = engine.snapshot({})
    assert len(learned) == 20
    assert (
        engine.calls == 1 + 3 + 2 * 20
    )  # version negotiation, version/images/containers, inspect+history each
    engine.calls = 0
    _, again = engine.snapshot(learned)
    assert (engine.calls, again) == (3, {})
    client.tag(ids[0], "a", "retagged")
    engine.calls = 0
    _, retagged = engine.snapshot(learned)
    assert engine.calls == 3 + 1  # the one image whose tags changed, for its last tag time
    assert list(retagged) == [ids[0]] and retagged[ids[0]].last_tag_time is not None
    assert retagged[ids[0]].layers == learned[ids[0]].layers


def test_a_kept_alive_connection_survives_an_engine_restart() -> None:
    with PrivateEngine() as private:
        client = docker.APIClient(base_url=private.url, version="auto")
        (image_id,) = load(client, [Spec(["a:1"], [Layer("x")])])
        engine = DockerEngine(private.url, 10)
        assert engine.current(image_id) == (("a:1",), ())
        private.stop()
        with pytest.raises(EngineUnavailable) as caught:
            engine.current(image_id)
        assert str(caught.value).startswith(f"cannot reach the Docker engine at {private.url}: ")
        private.start()
        assert engine.current(image_id) == (("a:1",), ())
        engine.close()
