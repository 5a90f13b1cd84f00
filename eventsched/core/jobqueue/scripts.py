"""The Lua scripts of the job queue, their key and argument contracts, and the SAQ release
they were checked against.

Every script reads and writes SAQ's own keys (``incomplete`` zset, ``queued`` and ``active``
lists, job records at ``saq:job:<queue>:<key>``) plus eventsched's ``owners`` hash and
wake-up channel; the contract of each (KEYS, ARGV, return value) is in the comment above it.
A script runs atomically in Redis: it applies whole or not at all, which is what the store's
invariants (no job moved twice, no lock, batches applied in order) rest on. Pure data, no I/O:
imported by :mod:`~eventsched.core.jobqueue.store`, :mod:`~eventsched.core.jobqueue.batcher`
and :mod:`~eventsched.core.jobqueue.adapter`.
"""

from __future__ import annotations

from typing import Final

from eventsched.core.runtime.errors import UntestedVersion

#: The SAQ releases this package was checked against: OnTimeQueue and OnTimeWorker override
#: internals of SAQ's RedisQueue and Worker (Lua scripts, key names, the job hand-out), which
#: any release may change. pyproject.toml pins the same range; :func:`check_saq_version`
#: stops start-up on another, and tests/integration/test_queue.py fails so an upgrade is reviewed here.
TESTED_SAQ_RELEASE: Final = "0.26"
TESTED_SAQ: Final = ">=0.26,<0.27"


def check_saq_version(installed: str | None = None) -> None:
    """Raise :class:`UntestedVersion` unless the installed SAQ is a ``0.26.x`` release."""
    import saq

    version = installed if installed is not None else saq.__version__
    if version.split(".")[:2] != TESTED_SAQ_RELEASE.split("."):
        raise UntestedVersion("saq", version, TESTED_SAQ)


# Enqueue many jobs in one atomic call. KEYS = incomplete, queued, then (job id, abort id)
# per job; ARGV = now, wake-up channel, then (payload, scheduled) per job. Same duplicate
# rule as SAQ's _enqueue (skip a key that is incomplete or being aborted). A job already due
# goes straight to `queued` with score 0 (SAQ only does that for scheduled == 0, and its
# `ARGV[2] == '0'` test misses a float 0.0, which would strand the job). The score is the
# caller's exact decimal string, never a Lua number (tostring would round to 14 digits).
ENQUEUE_LUA = """
local now = tonumber(ARGV[1])
local added = 0
local earliest = nil
local earliest_arg = nil
for i = 1, (#KEYS - 2) / 2 do
    local id = KEYS[1 + 2 * i]
    local payload = ARGV[1 + 2 * i]
    local scheduled = ARGV[2 + 2 * i]
    if not redis.call('ZSCORE', KEYS[1], id) and redis.call('EXISTS', KEYS[2 + 2 * i]) == 0 then
        redis.call('SET', id, payload)
        local due = tonumber(scheduled)
        if due <= now then
            redis.call('ZADD', KEYS[1], 0, id)
            redis.call('RPUSH', KEYS[2], id)
            due = 0
            scheduled = '0'
        else
            redis.call('ZADD', KEYS[1], scheduled, id)
        end
        if earliest == nil or due < earliest then
            earliest = due
            earliest_arg = scheduled
        end
        added = added + 1
    end
end
if earliest_arg then
    redis.call('PUBLISH', ARGV[2], earliest_arg)
end
return added
"""

# Move due jobs and claim some. KEYS = incomplete, queued, active; ARGV = now, move limit,
# claim limit, wake-up channel, '1' to return the moved ids, and state changes to apply
# first (the Batcher's JSON, or ''): finishes and start records of earlier jobs ride along
# with the claim instead of costing round trips of their own. Due = score in [1, now];
# moving sets score 0 (SAQ's marker for "queued or active"), which is what makes a second
# move impossible. Claimed ids go queued -> active like SAQ's BLMOVE (LEFT -> RIGHT) and
# their payloads are returned, so a claim costs one round trip however many jobs it
# carries. If moved jobs are left in `queued` (this process had no idle slot), the other
# processes are woken to take them. KEYS[4] (the owners hash) and ARGV[7] (the worker id,
# '' for none) record who took each claimed job, so a job taken by a worker that died before
# it could start it can be told from one that is being run (OnTimeQueue.requeue_orphans).
# Returns {claimed ids, payloads, next score or false,
# queued length, moved count, moved ids}.
CLAIM_LUA = """
if ARGV[6] ~= '' then
    for _, command in ipairs(cjson.decode(ARGV[6])) do
        redis.call(unpack(command))
    end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], 1, ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
    local members = {}
    for i, id in ipairs(due) do
        members[2 * i - 1] = 0
        members[2 * i] = id
    end
    redis.call('ZADD', KEYS[1], unpack(members))
    redis.call('RPUSH', KEYS[2], unpack(due))
end
local claimed = {}
local payloads = {}
for i = 1, tonumber(ARGV[3]) do
    local id = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT')
    if not id then
        break
    end
    claimed[i] = id
    payloads[i] = redis.call('GET', id)
    if ARGV[7] ~= '' then
        redis.call('HSET', KEYS[4], id, ARGV[7])
    end
end
local backlog = redis.call('LLEN', KEYS[2])
if #due > 0 and backlog > 0 then
    redis.call('PUBLISH', ARGV[4], '0')
end
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], 1, '+inf', 'LIMIT', 0, 1, 'WITHSCORES')
local moved = {}
if ARGV[5] == '1' then
    moved = due
end
return {claimed, payloads, nxt[2] or false, backlog, #due, moved}
"""


# SAQ's sweep script: take the sweep lock (whole seconds, fine for a once-a-minute job) and
# read every active job.
SWEEP_LUA = """
local id_jobs = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SETEX', KEYS[1], ARGV[1], 1)
    for i, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        id_jobs[i] = {v, redis.call('GET', v)}
    end
end
return id_jobs
"""

# Give a job taken by a dead worker back. KEYS = active, owners, queued, incomplete, job id;
# ARGV = the dead owner, the job's new record, wake-up channel. Only if the job is still in
# `active` under that owner (it did not finish, nobody requeued it meanwhile).
REQUEUE_ORPHAN_LUA = """
if redis.call('HGET', KEYS[2], KEYS[5]) ~= ARGV[1] then
    return 0
end
redis.call('HDEL', KEYS[2], KEYS[5])
if redis.call('LREM', KEYS[1], 0, KEYS[5]) == 0 then
    return 0
end
redis.call('SET', KEYS[5], ARGV[2])
redis.call('ZADD', KEYS[4], 0, KEYS[5])
redis.call('RPUSH', KEYS[3], KEYS[5])
redis.call('PUBLISH', ARGV[3], '0')
return 1
"""

# Compare-and-set of the reconciler's epoch marker.
MARKER_CAS_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# Apply a batch of commands atomically. ARGV[1] = JSON list of commands, each a list of
# strings/integers. One EVALSHA with one argument: redis-py packs each argument on its own,
# which costs more CPU than the commands themselves when every command word is an argument,
# and a MULTI pipeline is worse still (a reply parsed per command, the connection released through a
# shielded task).
APPLY_LUA = """
for _, command in ipairs(cjson.decode(ARGV[1])) do
    redis.call(unpack(command))
end
return 1
"""

# Remove pending jobs that no worker has taken (a cancelled event's). KEYS = incomplete,
# queued, then the job ids; ARGV = the job ids' keys (for the answer). A job scheduled
# (score >= 1) or queued (score 0, in `queued`) is removed with its record; a job taken by
# a worker (score 0, not in `queued`: claimed ahead or running) is left alone, the claim's
# compare-and-set in PostgreSQL stops it. Returns {removed keys, taken keys}.
REMOVE_LUA = """
local removed = {}
local taken = {}
for i = 3, #KEYS do
    local id = KEYS[i]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score then
        if tonumber(score) >= 1 or redis.call('LREM', KEYS[2], 0, id) > 0 then
            redis.call('ZREM', KEYS[1], id)
            redis.call('DEL', id)
            removed[#removed + 1] = ARGV[i - 2]
        else
            taken[#taken + 1] = ARGV[i - 2]
        end
    end
end
return {removed, taken}
"""

# Put one job at a new due time: move it if it is pending and no worker has taken it, add
# it if it is not pending. KEYS = incomplete, queued, job id, abort id; ARGV = now, wake-up
# channel, payload (the job's record with its new `scheduled`), score (exact decimal
# string). A job taken by a worker is left alone (its claim reads the due time from
# PostgreSQL: too early, it is put back at that time). Same due rule as ENQUEUE_LUA: a job
# already due goes straight to `queued` with score 0. Returns 'moved', 'added', 'taken' or
# 'aborting' (an abort of the key is in progress: nothing done, as for an enqueue).
PLACE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], KEYS[3])
local result = 'added'
if score then
    if tonumber(score) < 1 and redis.call('LREM', KEYS[2], 0, KEYS[3]) == 0 then
        return 'taken'
    end
    result = 'moved'
elseif redis.call('EXISTS', KEYS[4]) == 1 then
    return 'aborting'
end
redis.call('SET', KEYS[3], ARGV[3])
local scheduled = ARGV[4]
if tonumber(scheduled) <= tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], 0, KEYS[3])
    redis.call('RPUSH', KEYS[2], KEYS[3])
    scheduled = '0'
else
    redis.call('ZADD', KEYS[1], scheduled, KEYS[3])
end
redis.call('PUBLISH', ARGV[2], scheduled)
return result
"""
