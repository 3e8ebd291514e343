"""Coverage-guided fuzzing (atheris, libFuzzer) of the client-protocol parser
``gateway.protocol.requests.parse``: arbitrary bytes in, a typed request or a
``BadRequest`` out, never anything else.

    python fuzz/python/parse_fuzz.py fuzz/corpus/python_parse -max_total_time=600
    make fuzz-python            # 10 minutes;  make fuzz-smoke: 30 s (part of make test)

Invariants checked on every input:
- only ``BadRequest`` is raised, with code 4000 or 4001 and a short message;
- an echoed ``id`` is None, a number or a string of at most 64 characters;
- a ``Join``'s history is 0..50, a resume's seq >= 0 and epoch <= 64 characters;
- a ``Publish``'s ``cid`` is None or 1..64 characters, ``size`` is the input's length;
- a ``History``'s ``limit`` is 1..100 (1..200 paging forward), ``before_seq`` None or
  positive, ``after_seq`` None or >= 0 and below ``before_seq``;
- the conversation ops (protocol 1.1): ``Sync`` limits in range, ``before`` a pair;
  ``Read``/``Recall`` seqs in range; ``Create``/``Invite`` user lists bounded, no
  repeats, ``meta`` a JSON object of at most 4 KB; ``Remove`` names a user;
- a plugin op (``Custom``): an op name that is not the protocol's, the request object
  itself, ``size`` the input's length;
- rooms are non-empty strings; a request parses the same twice (no hidden state).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import orjson
    from gateway.protocol.requests import (
        MAX_CID_LEN,
        MAX_HISTORY,
        MAX_META_BYTES,
        MAX_PAGE,
        MAX_PAGE_FORWARD,
        MAX_SYNC_CONVS,
        MAX_SYNC_MSGS,
        MAX_USERS,
        BUILTIN_OPS,
        BadRequest,
        Create,
        Custom,
        History,
        Invite,
        Join,
        Leave,
        Ping,
        Publish,
        Read,
        Recall,
        Remove,
        Sync,
        Typing,
        is_op_name,
        parse,
    )


def _check_id(rid: object) -> None:
    assert rid is None or (isinstance(rid, (int, float)) and not isinstance(rid, bool)) or (isinstance(rid, str) and len(rid) <= 64), rid


def test_one_input(data: bytes) -> None:
    binary = bool(data[:1]) and data[0] == 0xFF
    try:
        req = parse(data, binary)
    except BadRequest as e:
        assert e.code in (4000, 4001), e.code
        assert 0 < len(e.message) <= 200, e.message
        _check_id(e.id)
        return
    _check_id(req.id)
    if isinstance(req, Join):
        assert isinstance(req.room, str) and req.room
        assert 0 <= req.history <= MAX_HISTORY
        if req.resume is not None:
            assert req.resume.seq >= 0 and len(req.resume.epoch) <= 64
    elif isinstance(req, Publish):
        assert isinstance(req.room, str) and req.room and isinstance(req.type, str) and 0 < len(req.type) <= 64
        assert req.cid is None or 0 < len(req.cid) <= MAX_CID_LEN
        assert req.size == len(data)
    elif isinstance(req, Leave):
        assert isinstance(req.room, str) and req.room
    elif isinstance(req, History):
        assert isinstance(req.room, str) and req.room
        assert 1 <= req.limit <= (MAX_PAGE if req.after_seq is None else MAX_PAGE_FORWARD)
        assert req.before_seq is None or req.before_seq >= 1
        assert req.after_seq is None or (req.after_seq >= 0 and (req.before_seq is None or req.after_seq < req.before_seq))
    elif isinstance(req, Sync):
        assert req.since >= 0 and 1 <= req.limit <= MAX_SYNC_CONVS and 0 <= req.msgs <= MAX_SYNC_MSGS
        assert req.before is None or (isinstance(req.before[0], int) and isinstance(req.before[1], str))
    elif isinstance(req, (Read, Recall)):
        assert isinstance(req.room, str) and req.room and req.seq >= (1 if isinstance(req, Recall) else 0)
    elif isinstance(req, Typing):
        assert isinstance(req.room, str) and req.room
    elif isinstance(req, (Create, Invite)):
        users = req.members if isinstance(req, Create) else req.users
        assert len(users) <= MAX_USERS and len(set(users)) == len(users) and all(isinstance(u, str) and u for u in users)
        if isinstance(req, Create):
            assert isinstance(orjson.loads(req.meta), dict) and len(req.meta) <= MAX_META_BYTES
        else:
            assert users
    elif isinstance(req, Remove):
        assert isinstance(req.room, str) and req.room and isinstance(req.user, str) and req.user
    elif isinstance(req, Custom):
        assert is_op_name(req.op) and req.op not in BUILTIN_OPS and req.msg.get("op") == req.op
        assert req.size == len(data)
    else:
        assert isinstance(req, Ping)
    assert parse(data, binary) == req


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
