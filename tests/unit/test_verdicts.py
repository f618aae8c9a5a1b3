"""The verdict logic on recorded traces, without root: the outage in sequence numbers, the disk judge, the guest
check against a real observer (its control socket, fed with heartbeats), and the rule that decides a commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from testbed.guest.heartbeat import FLAG_MEM_VIOLATION, Heartbeat
from testbed.guest.workload import IDLE_WSS, parse_workload
from testbed.lab.observer import Observer, Track
from testbed.migration import integrity
from testbed.migration.report import Integrity

PAUSED, RESUMED = 10.0, 10.060        # the switchover: source paused, destination resumed (60 ms)


def beats(*runs: tuple[float, float, range]) -> list[tuple[float, int, int]]:
    """Heartbeats at 1 kHz: each run is (first receive time, spacing, seqs)."""
    out = []
    for t0, dt, seqs in runs:
        out += [(t0 + i * dt, s, 0) for i, s in enumerate(seqs)]
    return out


# --- the outage, in sequence numbers ----------------------------------------------------------------
def test_plain_outage_runs_from_the_last_news_before_to_the_first_after() -> None:
    tr = beats((9.0, 0.001, range(1, 1001)), (10.080, 0.001, range(1001, 1100)))   # last before: 9.999
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None
    assert o["seq_before"] == 1000 and o["seq_after"] == 1001
    assert o["gap_ms"] == pytest.approx(81.0, abs=0.01)
    assert o["gap_ms"] == o["naive_ms"] and o["ignored"] == 0


def test_a_duplicate_after_the_resume_does_not_split_the_outage() -> None:
    """The last heartbeat before the pause arrives again 5 ms after the resume (seen at 0 ms RTT): the old rule
    (largest raw gap) reported only the larger half."""
    tr = beats((9.0, 0.001, range(1, 1001)))
    tr.append((10.065, 1000, 0))                                   # the duplicate
    tr += beats((10.120, 0.001, range(1001, 1050)))
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None and o["ignored"] == 1
    assert o["gap_ms"] == pytest.approx(121.0, abs=0.01)           # 9.999 -> 10.120
    assert o["naive_ms"] == pytest.approx(66.0, abs=0.01)          # 9.999 -> 10.065: the under-report
    assert o["seq_before"] == 1000 and o["seq_after"] == 1001


def test_reordered_and_lost_heartbeats() -> None:
    tr = beats((9.0, 0.001, range(1, 1001)))
    tr.append((10.100, 1003, 0))          # 1001, 1002 lost; 1003 is the first news
    tr.append((10.101, 1002, 0))          # arrives late: no news
    tr += beats((10.102, 0.001, range(1004, 1010)))
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None
    assert o["seq_after"] == 1003 and o["lost"] == 2 and o["ignored"] == 1
    assert o["gap_ms"] == pytest.approx(101.0, abs=0.01)


def test_a_heartbeat_in_flight_at_the_pause_is_news_from_before_it() -> None:
    """Sent before the pause, received 0.4 ms after it: the outage starts there, not at an earlier one."""
    tr = beats((9.0, 0.001, range(1, 1001)))
    tr.append((10.0004, 1001, 0))
    tr += beats((10.070, 0.001, range(1002, 1010)))
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None and o["seq_before"] == 1001
    assert o["gap_ms"] == pytest.approx(69.6, abs=0.01)


def test_a_restarted_or_silent_guest_has_no_outage_to_report() -> None:
    restarted = beats((9.0, 0.001, range(500, 1001)), (10.2, 0.001, range(1, 100)))   # seq starts again at 1
    assert integrity.outage(restarted, PAUSED, RESUMED) is None
    silent = beats((9.0, 0.001, range(1, 1001)))
    assert integrity.outage(silent, PAUSED, RESUMED) is None
    assert integrity.outage([], PAUSED, RESUMED) is None


# --- the heartbeat path's one-way delay across the move ------------------------------------------------------
def sent(t_send: list[float], seqs: range, delay_s: list[float] | float, clock0: float,
         frozen_s: float = 0.0) -> list[tuple[float, int, int]]:
    """Heartbeats sent at ``t_send`` (observer's clock) by a guest whose clock reads ``t - clock0 - frozen_s``,
    each arriving after its path delay."""
    delays = delay_s if isinstance(delay_s, list) else [delay_s] * len(t_send)
    return [(t + d, s, round((t - clock0 - frozen_s) * 1e9)) for t, s, d in zip(t_send, seqs, delays, strict=True)]


def test_the_path_change_is_the_extra_one_way_delay_of_a_moved_vm() -> None:
    """Observer at site A, VM moved from A (0.1 ms away) to B (25 ms away); its clock stood still 60 ms."""
    before = sent([9.0 + i * 0.001 for i in range(1000)], range(1, 1001), 0.0001, clock0=5.0)
    after = sent([10.060 + i * 0.001 for i in range(1000)], range(1001, 2001), 0.025, clock0=5.0, frozen_s=0.060)
    tr = before + after
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None
    assert o["gap_ms"] == pytest.approx(85.9, abs=0.01)      # 9.9991 -> 10.085: 61 ms stopped, 24.9 ms more path
    p = integrity.path_delay_change(tr, o, frozen_s=0.060)
    assert p is not None and p["change_ms"] == pytest.approx(24.9, abs=0.01)
    # the way back (B to A) shortens the outage by as much
    back = sent([9.0 + i * 0.001 for i in range(1000)], range(1, 1001), 0.025, clock0=5.0) + \
        sent([10.060 + i * 0.001 for i in range(1000)], range(1001, 2001), 0.0001, clock0=5.0, frozen_s=0.060)
    o = integrity.outage(back, PAUSED, RESUMED)
    assert o is not None
    p = integrity.path_delay_change(back, o, frozen_s=0.060)
    assert p is not None and p["change_ms"] == pytest.approx(-24.9, abs=0.01)
    assert o["gap_ms"] - p["change_ms"] == pytest.approx(61.0, abs=0.01)   # the stop and the 1 ms grid: both ways


def test_the_path_change_takes_the_fastest_heartbeat_not_the_queued_ones() -> None:
    """The first heartbeats after the resume wait in a queue (up to 30 ms more); one duplicate comes late."""
    n = 1000
    queued = [0.0301 - i * 0.001 if i < 30 else 0.0001 for i in range(n)]
    tr = sent([9.0 + i * 0.001 for i in range(n)], range(1, n + 1), 0.0001, clock0=5.0)
    tr.append((10.061, n, round((9.999 - 5.0) * 1e9)))                       # the duplicate: ignored
    tr += sent([10.060 + i * 0.001 for i in range(n)], range(n + 1, 2 * n + 1), queued, clock0=5.0, frozen_s=0.06)
    tr.sort()
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None
    p = integrity.path_delay_change(tr, o, frozen_s=0.060)
    assert p is not None and p["change_ms"] == pytest.approx(0.0, abs=0.01)
    assert p["before_n"] > 900 and p["after_n"] > 900


def test_no_path_change_without_the_guests_send_times() -> None:
    tr = beats((9.0, 0.001, range(1, 1001)), (10.080, 0.001, range(1001, 1100)))   # an agent without guest_ns
    o = integrity.outage(tr, PAUSED, RESUMED)
    assert o is not None and integrity.path_delay_change(tr, o, frozen_s=0.06) is None


# --- the disk judge -------------------------------------------------------------------------------------
def digest(chunks: list[str], ring: dict[str, Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"size_bytes": len(chunks) * 2**20, "chunk_bytes": 2**20, "chunks": chunks}
    if ring is not None:
        d["ring"] = ring
    return d


def ring(max_seq: int, bad: int = 0, holes: int = 0) -> dict[str, Any]:
    return {"nblocks": 256, "max_seq": max_seq, "bad_blocks": bad, "holes": holes, "bad": []}   # 1 MiB of ring


IDLE, WRITING = parse_workload("idle"), parse_workload("disk:5MB/s")

SRC = ["a", "b", "c", "d"]


def judge(src: dict[str, Any], dst: dict[str, Any], *, builtin: bool = True, workload: Any = IDLE,
          hb0: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    details: list[str] = []
    v = integrity.judge_disk("vm-disk0.qcow2", src, dst, builtin_guest=builtin, workload=workload, hb0=hb0,
                             details=details)
    return v, details


def test_identical_disks_are_verified() -> None:
    assert judge(digest(SRC), digest(SRC))[0] == "verified"


def test_an_idle_builtin_guest_whose_disks_differ_is_failed_not_unverified() -> None:
    """It writes nothing: any difference is a corrupted copy (it used to be 'unverified', then committed)."""
    v, details = judge(digest(SRC), digest(["a", "b", "X", "d"]))
    assert v == "failed"
    assert "writes nothing" in details[0] and "first at 2 MiB" in details[0]


def test_differences_a_writing_guest_explains_by_its_ring_are_verified() -> None:
    v, details = judge(digest(SRC, ring(100)), digest(["X", "b", "c", "d"], ring(140)), workload=WRITING,
                       hb0={"disk_seq": 100})
    assert v == "verified", details
    assert "40 blocks written after the move" in details[0]


def test_writing_guest_failures_outside_ring_holes_lost_writes() -> None:
    outside = judge(digest(SRC, ring(100)), digest(["a", "b", "X", "d"], ring(120)), workload=WRITING)
    assert outside[0] == "failed" and "outside the guest's block ring" in outside[1][0]
    holes = judge(digest(SRC, ring(100)), digest(["X", "b", "c", "d"], ring(120, holes=18)), workload=WRITING)
    assert holes[0] == "failed" and "18 missing sequence numbers" in holes[1][0]
    behind = judge(digest(SRC, ring(100)), digest(["X", "b", "c", "d"], ring(90)), workload=WRITING)
    assert behind[0] == "failed" and "before the source's" in behind[1][0]
    lost = judge(digest(SRC, ring(100)), digest(["X", "b", "c", "d"], ring(120)), workload=WRITING,
                 hb0={"disk_seq": 105})
    assert lost[0] == "failed" and "lacks writes the guest had completed" in lost[1][0]


def test_a_users_guest_whose_disks_differ_is_unverified_and_sizes_that_differ_fail() -> None:
    assert judge(digest(SRC), digest(["X", "b", "c", "d"]), builtin=False)[0] == "unverified"
    assert judge(digest(SRC), digest(SRC[:3]))[0] == "failed"


def test_the_written_since_resume_record_judges_any_guest() -> None:
    """With the destination's dirty bitmap, differences where the guest wrote after the resume are its writes,
    anywhere else damage: for the user's own guest too (which used to be only 'unverified')."""
    wrote = digest(["X", "b", "c", "d"]) | {"written_chunks": [0, 3]}
    v, details = judge(digest(SRC), wrote, builtin=False)
    assert v == "verified" and "all where the guest wrote after the resume" in details[0]
    stray = digest(["X", "b", "Y", "d"]) | {"written_chunks": [0]}
    v, details = judge(digest(SRC), stray, builtin=False)
    assert v == "failed" and "where the guest did not write after the resume (first at 2 MiB" in details[0]
    # the built-in disk-writing guest: the bitmap and the ring must both agree
    v, details = judge(digest(SRC, ring(100)), digest(["X", "b", "c", "d"], ring(140)) | {"written_chunks": []},
                       workload=WRITING)
    assert v == "failed" and "did not write" in details[0]
    v, _ = judge(digest(SRC, ring(100)), digest(["X", "b", "c", "d"], ring(140)) | {"written_chunks": [0]},
                 workload=WRITING, hb0={"disk_seq": 100})
    assert v == "verified"


def test_dirty_regions_of_qemu_img_map_become_chunks() -> None:
    """``qemu-img map`` with ``x-dirty-bitmap`` reports dirty ranges as neither present nor data."""
    from testbed.hostd.diskcheck import dirty_chunks
    MB = 2**20
    entries = [{"start": 0, "length": 3 * MB, "present": True, "data": True},
               {"start": 3 * MB, "length": 64 * 1024, "present": False, "data": False},
               {"start": 3 * MB + 64 * 1024, "length": 17 * MB - 64 * 1024, "present": True, "data": True},
               {"start": 20 * MB, "length": MB + 1, "present": False, "data": False},
               {"start": 21 * MB + 1, "length": 10 * MB, "present": True, "data": True}]
    assert dirty_chunks(entries) == [3, 20, 21]
    assert dirty_chunks([]) == []


# --- the rule that decides a commit -----------------------------------------------------------------------
@pytest.mark.parametrize(("memory", "disk", "running", "expected"), [
    ("verified", "verified", True, "verified"),
    ("verified", "none", True, "verified"),             # no disks: nothing to lose
    ("unverified", "verified", True, "unverified"),     # the user's own guest: memory cannot be checked
    ("verified", "unverified", True, "unverified"),
    ("failed", "verified", True, "failed"),
    ("verified", "failed", True, "failed"),
    ("unverified", "failed", True, "failed"),
    ("verified", "verified", False, "failed"),          # not running on the destination
])
def test_verdict_rule(memory: str, disk: str, running: bool, expected: str) -> None:
    integ = Integrity(memory=memory, disk=disk, guest_running=running)  # type: ignore[arg-type]
    assert integrity.verdict(integ) == expected


# --- check_guest against a real observer, fed a recorded switchover ---------------------------------------
def hb(seq: int, verified: int, errors: int = 0, flags: int = 0) -> Heartbeat:
    return Heartbeat(version=1, flags=flags, seq=seq, guest_ns=seq * 10**6, mem_pages_written=0,
                     mem_pages_verified=verified, mem_errors=errors, disk_seq=0, disk_errors=0, vm="web01")


@pytest.fixture
async def observer(tmp_path: Path) -> AsyncIterator[tuple[Path, Track]]:
    obs = Observer()
    tr = obs.tracks["web01"] = Track()
    sock = tmp_path / "obs.sock"
    server = await asyncio.start_unix_server(obs.control, path=str(sock))
    try:
        yield sock, tr
    finally:
        server.close()
        await server.wait_closed()


def record(tr: Track, *, after_verified: int, duplicate: bool = False, errors: int = 0, flags: int = 0) -> None:
    """A guest at 1 kHz, paused at 10.0 s, running again at 10.08 s; 9.999 is its last heartbeat before."""
    for i in range(1000):
        tr.add(9.0 + i * 0.001, hb(1 + i, verified=i), "198.19.1.1")
    if duplicate:
        tr.add(10.065, hb(1000, verified=999), "198.19.1.1")
    for i in range(200):
        tr.add(10.080 + i * 0.001, hb(1001 + i, verified=1000 + after_verified * i // 199, errors=errors,
                                      flags=flags), "198.19.2.1")


async def guest(sock: Path, tr: Track, integ: Integrity) -> integrity.GuestTimes:
    hb0 = (await integrity.heartbeat_before(sock, "web01", PAUSED))
    return await integrity.check_guest(sock, "web01", hb0, precopy_s=9.0, paused_s=PAUSED, resumed_s=RESUMED,
                                       workload=IDLE, integ=integ, verify_timeout_s=0.5)


async def test_check_guest_verifies_memory_and_measures_the_outage(observer: tuple[Path, Track]) -> None:
    sock, tr = observer
    record(tr, after_verified=IDLE_WSS // 4096, duplicate=True)
    integ = Integrity()
    times = await guest(sock, tr, integ)
    assert integ.memory == "verified" and integ.guest_running, integ.details
    assert times.observed_ms == pytest.approx(81.0, abs=0.01)          # 9.999 -> 10.080, the duplicate ignored
    assert times.naive_ms == pytest.approx(66.0, abs=0.01)             # what the split-gap rule said
    # the guest's clock moved 1 ms across the 81 ms outage and stood still 60 ms: its path took 20 ms longer
    assert times.path_change_ms == pytest.approx(20.0, abs=0.01)


async def test_check_guest_fails_memory_on_errors(observer: tuple[Path, Track]) -> None:
    sock, tr = observer
    record(tr, after_verified=IDLE_WSS // 4096, errors=3, flags=FLAG_MEM_VIOLATION)
    integ = Integrity()
    await guest(sock, tr, integ)
    assert integ.memory == "failed" and "3 bad memory pages" in integ.details[-1]


async def test_check_guest_leaves_a_short_verification_pass_unverified(observer: tuple[Path, Track]) -> None:
    sock, tr = observer
    record(tr, after_verified=10)               # the guest verified 10 pages only: not a whole pass
    integ = Integrity()
    await guest(sock, tr, integ)
    assert integ.memory == "unverified" and "did not finish a verification pass" in integ.details[-1]


async def test_check_guest_fails_a_guest_that_restarted(observer: tuple[Path, Track]) -> None:
    sock, tr = observer
    for i in range(1000):
        tr.add(9.0 + i * 0.001, hb(1 + i, verified=i), "198.19.1.1")
    for i in range(50):                          # booted again: its sequence numbers start from 1
        tr.add(12.0 + i * 0.001, hb(1 + i, verified=0), "198.19.2.1")
    integ = Integrity()
    times = await guest(sock, tr, integ)
    assert integ.memory == "failed" and "restarted" in integ.details[-1]
    assert times.observed_ms is None


async def test_check_guest_without_a_heartbeat_before_the_pause_fails(observer: tuple[Path, Track]) -> None:
    sock, _ = observer
    integ = Integrity()
    times = await integrity.check_guest(sock, "web01", None, precopy_s=9.0, paused_s=PAUSED, resumed_s=RESUMED,
                                        workload=IDLE, integ=integ)
    assert integ.memory == "failed" and times.observed_ms is None


# --- measurement quality ----------------------------------------------------------------------------------
def test_a_measurement_refuses_a_busy_machine_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.errors import InputError
    from testbed.lab import quality
    monkeypatch.setattr(quality, "cpus", lambda: 2)
    monkeypatch.setattr(quality, "load1", lambda: 2.4)
    with pytest.raises(InputError, match=r"load average is 2.40, above 1.5 on this 2-CPU machine"):
        quality.refuse_if_busy("testbed bench", force=False)
    quality.refuse_if_busy("testbed bench", force=True)
    monkeypatch.setattr(quality, "load1", lambda: 0.3)
    quality.refuse_if_busy("testbed bench", force=False)


def test_the_watch_marks_a_run_whose_load_rose(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.lab import quality
    monkeypatch.setattr(quality, "cpus", lambda: 2)
    with quality.Watch() as w:
        w.max_load1 = 3.2                # what the sampler would have seen at the run's busiest
    q = w.summary()
    assert q["loaded"] and q["max_load_1m"] >= 3.2 and 0 <= q["steal_pct"] <= 100
    assert len(q["load_at_start"]) == len(q["load_at_end"]) == 3


# --- one clock ----------------------------------------------------------------------------------------------
async def test_a_remote_clock_is_mapped_within_its_uncertainty() -> None:
    """A host whose monotonic clock is 1234.5 s ahead, behind a channel whose delays vary (one slow answer):
    the best exchange's midpoint gives the offset within half its round trip."""
    import time

    from testbed.migration import clock
    delays = iter([0.030, 0.002, 0.011, 0.003, 0.050, 0.002, 0.004, 0.009])

    async def remote_now() -> float:
        d = next(delays)
        await asyncio.sleep(d / 2)
        t = time.monotonic() + 1234.5
        await asyncio.sleep(d / 2)
        return t
    off = await clock.measure(remote_now)
    assert abs(off.offset_s - 1234.5) <= off.uncertainty_s + 0.002
    assert off.rtt_s < 0.02                      # the slow exchanges were not the one used
    ev = {"monotonic_s": 2000.0, "t_s": 2001.0, "status": "active", "remaining_bytes": 7, "exhausted": True}
    clock.map_instants(ev, off)
    assert ev["monotonic_s"] == pytest.approx(2000.0 - off.offset_s)
    assert ev["t_s"] == pytest.approx(2001.0 - off.offset_s)
    assert ev["remaining_bytes"] == 7 and ev["exhausted"] is True and ev["status"] == "active"
    assert off.to_engine(off.to_remote(5.0)) == pytest.approx(5.0)


def test_the_summary_renders_every_result() -> None:
    """The CLI's summary table for each result word (an unverified move once crashed it)."""
    import typing

    from rich.console import Console

    from testbed.migration.report import Bytes, Downtime, Endpoint, MigrationReport, Stalls
    from testbed.ui import summary
    for result in typing.get_args(MigrationReport.model_fields["result"].annotation):
        r = MigrationReport(vm="v", source=Endpoint(vcenter="a", host="h1", datastore="d"),
                            destination=Endpoint(vcenter="b", host="h2", datastore="d"), result=result, phases=[],
                            rounds=[], downtime_ms=Downtime(reported=10, observed=50), stalls_ms=Stalls(),
                            bytes=Bytes(), integrity=Integrity(), streams=1, converge="adaptive", bandwidth_bps=None,
                            link_bandwidth_bps=None, total_s=1.0, error=None, started_at="now", source_kept=True,
                            machine={"load_at_start": [0.5, 0, 0], "load_at_end": [0.7, 0, 0], "max_load_1m": 0.7,
                                     "steal_pct": 0.0, "loaded": False})
        with Console(width=200, record=True) as con:
            con.print(summary(r))
        assert result.upper() in con.export_text()
