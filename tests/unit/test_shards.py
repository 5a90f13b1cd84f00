"""Shards: the id hash that picks an event's shard, limit shares, and the shard settings."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from typing import Any

import pytest

from eventsched.core.jobqueue.limits import Lane
from eventsched.core.jobqueue.shards import id_hash, jump_hash, lane_share, shard_of
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import build_settings, load_settings, require_redis
from eventsched.plugins.executor.role import split_slots

A = "redis://127.0.0.1:6379/0"
B = "redis://127.0.0.1:6380/0"
C = "redis://127.0.0.1:6381/0"


# -- the hash ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "buckets", "bucket"),
    [  # the published vectors of the jump consistent hash (the Go and C implementations')
        (1, 1, 0),
        (42, 57, 43),
        (0xDEAD10CC, 1, 0),
        (0xDEAD10CC, 666, 361),
        (256, 1024, 520),
        (1, 128, 55),
        (129, 128, 120),
        (128, 100_000_000, 38_172_097),
        (2**64 - 1, 128, 92),
    ],
)
def test_jump_hash_matches_the_published_vectors(key: int, buckets: int, bucket: int) -> None:
    assert jump_hash(key, buckets) == bucket


def test_the_id_hash_is_blake2b_64_of_the_utf8_id_big_endian() -> None:
    # Pinned: a change here moves every pending job to another shard.
    assert id_hash("abc") == 0xD8BB14D833D59559
    assert id_hash("0192f5e0-0000-7000-8000-000000000000") == 0x96E62ABD2E7085F3


def test_known_ids_map_to_known_shards() -> None:
    ids = [f"0192f5e0-0000-7000-8000-{i:012d}" for i in range(5)]
    assert [shard_of(i, 2) for i in ids] == [0, 0, 0, 1, 0]
    assert [shard_of(i, 1) for i in ids] == [0] * 5


def test_every_attempt_of_an_event_lives_on_the_event_s_shard() -> None:
    for _ in range(200):
        event = str(uuid.uuid4())
        home = shard_of(event, 5)
        assert {shard_of(f"{event}#{n}", 5) for n in range(2, 6)} == {home}


def test_the_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    ids = [str(uuid.UUID(int=i * 7919)) for i in range(50)]
    here = [shard_of(i, 3) for i in ids]
    code = (
        "import sys; from eventsched.core.jobqueue.shards import shard_of; "
        "print(','.join(str(shard_of(i, 3)) for i in sys.argv[1:]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *ids],
        env={"PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [int(x) for x in out.strip().split(",")] == here


def test_ids_spread_evenly_and_a_new_shard_takes_only_its_share() -> None:
    ids = [str(uuid.uuid4()) for _ in range(20_000)]
    two = [shard_of(i, 2) for i in ids]
    three = [shard_of(i, 3) for i in ids]
    for count in Counter(two).values():
        assert abs(count - 10_000) < 600
    moved = [(a, b) for a, b in zip(two, three, strict=True) if a != b]
    # About a third moves, and only to the new shard; nothing moves between old shards.
    assert abs(len(moved) - 20_000 / 3) < 600
    assert {b for _, b in moved} == {2}


# -- limits divided among shards -----------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_lane_shares_add_up_to_the_limit(count: int) -> None:
    lane = Lane("t", priority=3, concurrency=7, rate=10.0, burst=5, lease=30.0)
    shares = [lane_share(lane, i, count) for i in range(count)]
    assert sum(s.concurrency for s in shares) == 7
    assert sum(s.burst for s in shares) == 5
    assert sum(s.rate for s in shares) == pytest.approx(10.0)
    assert all(s.concurrency >= 1 and s.burst >= 1 for s in shares)
    assert {(s.name, s.priority, s.lease) for s in shares} == {("t", 3, 30.0)}


def test_an_unlimited_lane_stays_unlimited_on_every_shard() -> None:
    lane = Lane("t", priority=5)
    assert {lane_share(lane, i, 3) for i in range(3)} == {lane}


def test_slots_are_shared_out_among_the_served_shards() -> None:
    assert split_slots(10, 1) == [10]
    assert split_slots(10, 3) == [4, 3, 3]
    assert split_slots(1, 2) == [1, 1]  # every served shard gets a slot


# -- settings --------------------------------------------------------------------------------------


def settings(**sections: Any) -> Any:
    return build_settings(sections)


def test_redis_url_is_the_one_shard_shorthand() -> None:
    assert require_redis(settings(redis={"url": A})) == (A,)
    assert require_redis(settings(redis={"shards": [A, B]})) == (A, B)


def test_shards_and_the_executor_s_subset_from_environment_variables() -> None:
    s = load_settings(
        environ={
            "EVENTSCHED_REDIS__URL": "",
            "EVENTSCHED_REDIS__SHARDS": f'["{A}", "{B}"]',
            "EVENTSCHED_EXECUTOR__SHARDS": "[1]",
        }
    )
    assert require_redis(s) == (A, B)
    assert s.executor.shards == (1,)


@pytest.mark.parametrize(
    ("sections", "key", "words"),
    [
        ({"redis": {"url": A, "shards": [A, B]}}, "redis.shards", "not both"),
        ({"redis": {"shards": [A, "http://x"]}}, "redis.shards[1]", "must start with redis://"),
        ({"redis": {"shards": [A, B, A]}}, "redis.shards[2]", "same URL"),
        ({"redis": {"shards": [A, B]}, "executor": {"shards": [2]}}, "executor.shards", "0 to 1"),
        ({"redis": {"url": A}, "executor": {"shards": [1]}}, "executor.shards", "0 to 0"),
        ({"redis": {"shards": [A, B]}, "executor": {"shards": [1, 1]}}, "executor.shards", "twice"),
        (
            {"redis": {"shards": [A, B, C]}, "types": {"t": {"concurrency": 2}}},
            "types.t.concurrency",
            "number of shards (3)",
        ),
        (
            {"redis": {"shards": [A, B]}, "types": {"t": {"rate": 1.5}}},
            "types.t.burst",
            "is 1 (by default: the rate)",
        ),
        (
            {"redis": {"shards": [A, B, C]}, "types": {"t": {"rate": 9, "burst": 2}}},
            "types.t.burst",
            "number of shards (3)",
        ),
    ],
)
def test_bad_shard_settings_name_the_setting(
    sections: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**sections)
    assert info.value.key == key
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_limits_every_shard_can_share_are_accepted() -> None:
    s = settings(
        redis={"shards": [A, B]},
        types={"t": {"concurrency": 2, "rate": 0.5, "burst": 2}, "u": {"rate": 4}},
    )
    assert s.types["t"].concurrency == 2
