"""Media on the production shape (issue 17): two nodes on Redis and PostgreSQL with the
S3 backend (a real s3s-fs). A file uploaded through one node is sent through the other
and downloaded by a user on either; a risky verdict given on one node recalls the message
for members on both and removes the object from the bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.gateway import GatewayProcess, uniq
from support.postgres import migrate
from support.redis import RedisServer
from support.routes import conversation, routes
from test_media import jpeg, next_msg

from gateway.client import GatewayClient, GatewayError


async def test_upload_on_one_node_send_and_download_on_the_other_and_recall_across(
    redis_server: RedisServer, postgres_db: str, s3_server: Any, tmp_path: Path,
) -> None:
    s3 = s3_server
    migrate(postgres_db)
    bucket = f"cluster-{uniq().lower()}"
    sets = [
        "store.kind=postgres", f"store.dsn={postgres_db}", "limits.client_rate=0", "media.backend=s3",
        f"media.s3.endpoint={s3.endpoint}", f"media.s3.bucket={bucket}", f"media.s3.access_key={s3.access_key}",
        f"media.s3.secret_key={s3.secret_key}", "media.s3.create_bucket=true",
    ]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    config = routes(conversation("dm:{a}:{b}", "dm", members_max=2))
    n0, n1 = (GatewayProcess(tmp_path / f"n{i}", sets, config=config, args=args).start() for i in range(2))
    alice, bob = f"alice{uniq()}", f"bob{uniq()}"
    room = GatewayClient.dm_room(alice, bob)
    try:
        up_client = await n0.client(alice)   # uploads through node 0
        a = await n1.client(alice)           # sends through node 1
        b = await n0.client(bob)
        await b.request("sync")
        photo = jpeg(320, 240)
        up = await up_client.upload(photo, kind="image")
        ack = await a.publish(room, {"file_id": up["file_id"]}, type="image")
        msg = await next_msg(b, lambda m: m.get("room") == room and m.get("seq") == ack["seq"])
        assert (msg["data"]["w"], msg["data"]["h"]) == (320, 240)
        async with aiohttp.ClientSession() as s:
            for url in (up["url"], msg["data"]["url"]):
                async with s.get(url) as r:
                    assert r.status == 200 and await r.read() == photo
        # Another user cannot send it, on either node.
        eve_id = f"eve{uniq()}"
        eve = await n1.client(eve_id)
        with pytest.raises(GatewayError) as e:
            await eve.publish(GatewayClient.dm_room(eve_id, bob), {"file_id": up["file_id"]}, type="image")
        assert e.value.code == 4036
        recalled = b.wait_event(lambda m: m.get("op") == "recall" and m.get("room") == room, 15)
        status, body = await n1.api("POST", f"/v1/media/{up['file_id']}/verdict", {"verdict": "risky"})
        assert status == 200, body
        assert (await recalled)["seq"] == ack["seq"]
        assert not [p for p in s3.data.rglob(up["file_id"]) if p.is_file()]
        page = await b.request("history", room=room, limit=5)
        assert [m["type"] for m in page["msgs"]] == ["recalled"]
        for c in (up_client, a, b, eve):
            await c.close()
    finally:
        for n in (n0, n1):
            assert not n.finish()
