"""Attacks on the issue #11 hardening that got through (red team), each a
test that failed on the code before its fix.

Core-level where the fault is in the core (plain calls on `RelayCore`, fake
clock); the shell's faults run a real relay on 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import trio

from parley.relay import admission as adm
from parley.relay.observe import RecordingObserver
from support.coreharness import Harness, check_quota_accounting, error_code

VICTIM = "198.51.100.7"
ATTACKER = "203.0.113.9"


def frames(out: dict, conn: int) -> list[dict]:
    return [json.loads(t) for t in out.get(conn, [])]


def create(h: Harness, conn: int) -> tuple[str, str]:
    got = frames(h.send(conn, {"t": "CREATE_SESSION", "data": {"side": "inviter"}}), conn)
    codes = [f["data"]["code"] for f in got if f["t"] == "INVITE_CODE"]
    return got[0]["sid"], codes[0]


def join(code: str) -> dict:
    return {"t": "JOIN", "data": {"code": code, "publicKey": "ab", "side": "joiner"}}


# --- code guessing: a JOIN that fails after the lookup is an oracle -------------------


def test_join_from_a_full_connection_does_not_reveal_a_live_code_or_its_sid():
    """Attack: fill one connection's sessions (REATTACH to made-up SIDs), then
    guess codes. A live code used to answer `rate_limited` WITH THE SESSION'S
    SID (a wrong one `bad_code`), without consuming the code: the attacker
    learns live codes silently and the SID, which is all it takes to
    REATTACH to the victim's session."""
    h = Harness(max_sessions_per_conn=3)
    h.connect(1, VICTIM)
    sid, code = create(h, 1)
    h.connect(2, ATTACKER)
    for i in range(3):
        h.send(2, {"t": "REATTACH", "sid": f"made-up-{i}"})
    wrong = "000000" if code != "000000" else "000001"
    answers = {}
    for guess in (wrong, code):
        got = [f for f in frames(h.send(2, join(guess)), 2) if f["t"] == "ERROR"]
        assert len(got) == 1
        answers[guess] = got[0]
    assert sid not in json.dumps(answers)
    # same answer for a live and a dead code: nothing learnt
    assert error_code(answers[wrong]) == error_code(answers[code])
    # and the victim's code still works for the real joiner
    h.connect(3, VICTIM)
    assert any(f["t"] == "JOIN_REQUEST" for f in frames(h.send(3, join(code)), 1))


# --- a QUEUED frame replayed to a legacy receiver that drops is never lost ----------


def _queued_then_replayed_to_a_dropping_legacy_receiver(h: Harness) -> list:
    """conn 1 (sided sender) stores m1 (QUEUED); conn 2, a legacy receiver,
    REATTACHes and gets it replayed, done-once-written, but is dropped before
    it is written: returns the Requeue tokens the shell hands back."""
    from parley.relay.actions import Send

    h.connect(1, VICTIM)
    h.send(1, {"t": "REATTACH", "sid": "s", "data": {"side": "a"}})
    out = h.send(1, {"t": "MSG", "sid": "s", "data": {"payload": "ab" * 50, "msgID": "m1"}})
    assert [json.loads(t)["t"] for t in out[1]] == ["QUEUED"]  # acknowledged: on disk
    h.disconnect(1)
    h.connect(2, VICTIM)
    actions = h.core.receive(2, json.dumps({"t": "REATTACH", "sid": "s"}))
    h.run(actions)
    tokens = [a.requeue for a in actions if isinstance(a, Send) and a.requeue is not None]
    assert len(tokens) == 1
    return tokens


def _replayed_later(h: Harness) -> list[str]:
    h.connect(3, VICTIM)
    out = h.send(3, {"t": "REATTACH", "sid": "s"})
    return [f["data"]["msgID"] for f in frames(out, 3) if f["t"] == "MSG"]


def test_queued_frame_survives_a_legacy_replay_dropped_while_the_store_is_down():
    """Attack (or bad luck): the store fails while a legacy receiver is being
    replayed a QUEUED frame and is dropped before it was written. `requeue`
    kept nothing while the store was down, and the replay's DeleteFrame
    committed on recovery: an acknowledged frame was lost."""
    h = Harness()
    tokens = _queued_then_replayed_to_a_dropping_legacy_receiver(h)
    h.core.set_store_available(False)
    h.run(h.core.requeue(2, tokens))
    h.disconnect(2)
    h.core.set_store_available(True)
    assert [f.msg_id for f in h.store.snapshot().frames] == ["m1"]  # the store agrees
    assert _replayed_later(h) == ["m1"]
    check_quota_accounting(h.core)


def test_queued_frame_survives_a_legacy_replay_dropped_when_its_share_filled_meanwhile():
    """While the replayed frame sits in the dropped receiver's buffer, its
    sender's address stores up to its share elsewhere (or an attacker fills
    the open part, so the reserve rule applies): the requeue was refused like
    a new frame, and the acknowledged frame was lost."""
    h = Harness(queue_total_bytes=20_000, reserve_percent=0)  # 2,000 bytes per address
    tokens = _queued_then_replayed_to_a_dropping_legacy_receiver(h)
    h.connect(4, VICTIM)
    answers = [reply for i in range(40) for reply in [
        frames(h.send(4, {"t": "MSG", "sid": "t", "data": {"payload": "cd" * 50, "msgID": f"x{i}"}}), 4)[-1]["t"]]]
    assert "DELIVERED_FAILED" in answers  # the address's share is full now
    h.run(h.core.requeue(2, tokens))
    h.disconnect(2)
    assert _replayed_later(h) == ["m1"]
    check_quota_accounting(h.core)


# --- the connection edge: one network, many address keys --------------------------


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"_redteam_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_admission_caps_handshakes_and_connections_per_prefix():
    """Attack: slowloris from many addresses of one /24 (or /64s of one IPv6
    /48, which every IPv6 customer holds): 64 x 16 handshakes filled the
    relay-wide 1,024 and every new connection got 503, /readyz too."""
    obs = RecordingObserver()
    a = adm.Admission(adm.AdmissionLimits(
        max_connections=100, conns_per_address=10, max_handshakes=100, handshakes_per_address=2,
        conns_per_prefix=5, handshakes_per_prefix=4,
    ), obs)
    net = "2001:db8:1::/48"
    tickets = [a.admit(f"2001:db8:1:{i}::/64", 0.0, net) for i in range(2) for _ in range(2)]
    assert all(isinstance(t, adm.Ticket) for t in tickets)
    assert a.admit("2001:db8:1:9::/64", 0.0, net) == adm.HANDSHAKES_PER_PREFIX
    assert isinstance(a.admit("2001:db8:2::/64", 0.0, "2001:db8:2::/48"), adm.Ticket)  # another network
    for t in tickets:
        a.handshake_done(t)
    assert isinstance(a.admit("2001:db8:1:9::/64", 0.0, net), adm.Ticket)  # 5 open now
    assert a.admit("2001:db8:1:a::/64", 0.0, net) == adm.CONNS_PER_PREFIX
    assert a.count_prefix(net) == (5, 1)
    assert a.not_ready(0.0) is None  # one network never makes the relay unready
    assert obs.kinds() == {adm.HANDSHAKES_PER_PREFIX, adm.CONNS_PER_PREFIX}
    for t in tickets:
        a.release(t)
        a.release(t)
    assert a.count_prefix(net) == (1, 1)


async def test_slowloris_from_one_slash24_leaves_room_for_others():
    live = _sibling("test_relay_live")
    obs = RecordingObserver()
    options = {"server_options": {"max_handshakes": 8, "handshakes_per_address": 2, "handshakes_per_prefix": 4},
               "transport_options": {"handshake_timeout": 5.0}}

    async def tcp_from(port: int, source: str) -> trio.SocketStream:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        return trio.SocketStream(sock)

    with trio.fail_after(15):
        async with live.running_relay(core=live.FakeCore(), observer=obs, **options) as (server, port):
            held = []
            for host in range(1, 5):  # 4 addresses of 127.0.1.0/24, 2 silent handshakes each
                for _ in range(2):
                    held.append(await tcp_from(port, f"127.0.1.{host}"))
                    await held[-1].send_all(b"GET / HTTP/1.1\r\n")
            while server.admission.handshakes + server.admission.refusing < 8:
                await trio.sleep(0.01)
            stream = await tcp_from(port, "127.0.2.1")
            await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, rest = await live.read_http_response(stream)
            body = rest + await live.read_to_eof(stream)
            assert (status, body) == (200, b"ready\n")
            assert server.admission.handshakes == 4
            assert "handshakes_per_prefix" in obs.kinds()
            for s in held:
                await s.aclose()
