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


# Enqueue many jobs in one atomic call. KEYS = incomplete, queued, lanes, then (job id,
# abort id) per job; ARGV = now, wake-up channel, the job id prefix, the lane key prefix,
# then (payload, scheduled) per job. Same duplicate rule as SAQ's _enqueue (skip a key that
# is incomplete or being aborted). A job already due goes straight to `queued` with score 0
# (SAQ only does that for scheduled == 0, and its `ARGV[2] == '0'` test misses a float 0.0,
# which would strand the job), or to its lane's `ready` zset if its event has a lane (the
# claim script's routing, see CLAIM_LUA). The score is the caller's exact decimal string,
# never a Lua number (tostring would round to 14 digits).
ENQUEUE_LUA = """
local now = tonumber(ARGV[1])
local added = 0
local earliest = nil
local earliest_arg = nil
local plen = #ARGV[3]
for i = 1, (#KEYS - 3) / 2 do
    local id = KEYS[2 + 2 * i]
    local payload = ARGV[3 + 2 * i]
    local scheduled = ARGV[4 + 2 * i]
    if not redis.call('ZSCORE', KEYS[1], id) and redis.call('EXISTS', KEYS[3 + 2 * i]) == 0 then
        redis.call('SET', id, payload)
        local due = tonumber(scheduled)
        if due <= now then
            redis.call('ZADD', KEYS[1], 0, id)
            local event = string.match(string.sub(id, plen + 1), '^[^#]+')
            local lane = redis.call('HGET', KEYS[3], event)
            if lane then
                redis.call('ZADD', ARGV[4] .. lane .. ':ready', scheduled, id)
            else
                redis.call('RPUSH', KEYS[2], id)
            end
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

# Move due jobs and claim some. KEYS = incomplete, queued, active, owners, lanes; ARGV = now
# (the due cutoff: the claimer's clock plus its claim-ahead), move limit, claim limit, wake-up
# channel, '1' to return the moved ids, state changes to apply first (the Batcher's JSON, or
# ''), the worker id ('' for none), the lanes (limits.encode_lanes' JSON, or '' for none),
# the claimer's clock (for leases and token buckets), the job id prefix, the lane key prefix,
# the shared queue's priority.
#
# State changes first: finishes and start records of earlier jobs ride along with the claim
# instead of costing round trips of their own. Due = score in [1, now]; moving sets score 0
# (SAQ's marker for "queued or active"), which is what makes a second move impossible. A
# moved job waits in `queued`, or, if its event has a lane (the `lanes` hash: event id ->
# lane, written at enqueue), in the lane's `ready` zset (score: its due time). Claiming
# serves the lanes and `queued` in priority order: `queued` like SAQ's BLMOVE (LEFT ->
# RIGHT; a laned job found there, put there by a path that does not route, goes to its
# lane), a lane while its limits allow (limits.py: a concurrency lease per job in flight,
# a rate token per start; a lane whose jobs turned up in `queued` after its turn is served
# again); a lane that is out of slots or tokens is skipped, so it holds
# back no other work, and records when and why it blocked (a job due by then was *held*).
# Claimed payloads are returned, so a claim costs one round trip however many jobs it
# carries. If runnable jobs are left (this process had no idle slot), the other processes
# are woken to take them. The owners hash records who took each claimed job, so a job
# taken by a worker that died before it could start it can be told from one that is being
# run (orphans.requeue_orphans).
# Returns {claimed ids, payloads, next score or false, runnable backlog, moved count,
# moved ids, lane per claimed job, held reason per claimed job, next lane wake-up or false}.
CLAIM_LUA = """
if ARGV[6] ~= '' then
    for _, command in ipairs(cjson.decode(ARGV[6])) do
        redis.call(unpack(command))
    end
end
local lanes = {}
local byname = {}
if ARGV[8] ~= '' then
    for i, c in ipairs(cjson.decode(ARGV[8])) do
        local key = ARGV[11] .. c[1]
        local lane = {name = c[1], priority = c[2], concurrency = c[3], rate = c[4],
                      burst = c[5], lease = c[6], order = i, state = key,
                      ready = key .. ':ready', leases = key .. ':leases'}
        lanes[i] = lane
        byname[c[1]] = lane
    end
end
local plen = #ARGV[10]
local function lane_of(id)
    if #lanes == 0 then
        return nil
    end
    local event = string.match(string.sub(id, plen + 1), '^[^#]+')
    local name = redis.call('HGET', KEYS[5], event)
    if name then
        return byname[name]
    end
    return nil
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], 1, ARGV[1], 'LIMIT', 0, ARGV[2], 'WITHSCORES')
local moved = {}
if #due > 0 then
    local members = {}
    local plain = {}
    for i = 1, #due, 2 do
        local id = due[i]
        moved[#moved + 1] = id
        members[#members + 1] = 0
        members[#members + 1] = id
        local lane = lane_of(id)
        if lane then
            redis.call('ZADD', lane.ready, due[i + 1], id)
        else
            plain[#plain + 1] = id
        end
    end
    redis.call('ZADD', KEYS[1], unpack(members))
    if #plain > 0 then
        redis.call('RPUSH', KEYS[2], unpack(plain))
    end
end
local clock = tonumber(ARGV[9])
local remaining = tonumber(ARGV[3])
local claimed, payloads, claimed_lanes, reasons = {}, {}, {}, {}
local function take(id, lane, reason)
    local i = #claimed + 1
    claimed[i] = id
    payloads[i] = redis.call('GET', id)
    claimed_lanes[i] = lane
    reasons[i] = reason
    if ARGV[7] ~= '' then
        redis.call('HSET', KEYS[4], id, ARGV[7])
    end
    remaining = remaining - 1
end
local runnable = 0
local wake = nil
local function wake_at(t)
    if wake == nil or t < wake then
        wake = t
    end
end
local function serve_queued()
    local scanned = 0
    while remaining > 0 and scanned < tonumber(ARGV[2]) do
        local id = redis.call('LPOP', KEYS[2])
        if not id then
            break
        end
        scanned = scanned + 1
        local lane = lane_of(id)
        if lane then
            redis.call('ZADD', lane.ready, ARGV[1], id)
            lane.again = lane.served
        else
            redis.call('RPUSH', KEYS[3], id)
            take(id, '', '')
        end
    end
end
local function serve_lane(lane)
    local state = redis.call('HMGET', lane.state, 'tokens', 'ts', 'blocked_at', 'reason')
    local blocked_at = tonumber(state[3]) or -1
    -- The bucket as of `ts`: refilled up to the claimer's clock, and up to the due time
    -- of a job claimed ahead of it (it starts then), so starts are 1/rate apart.
    local tokens = tonumber(state[1]) or lane.burst
    local ts = tonumber(state[2]) or clock
    local function refill(t)
        if t > ts then
            tokens = math.min(lane.burst, tokens + (t - ts) * lane.rate)
            ts = t
        end
    end
    refill(clock)
    if lane.concurrency > 0 then
        redis.call('ZREMRANGEBYSCORE', lane.leases, '-inf', clock)
    end
    local reason = nil
    while true do
        local head = redis.call('ZRANGE', lane.ready, 0, 0, 'WITHSCORES')
        if #head == 0 then
            break
        end
        if lane.concurrency > 0 and redis.call('ZCARD', lane.leases) >= lane.concurrency then
            reason = 'concurrency'
            local first = redis.call('ZRANGE', lane.leases, 0, 0, 'WITHSCORES')
            wake_at(tonumber(first[2]))
            break
        end
        if lane.rate > 0 then
            refill(tonumber(head[2]))
            if tokens < 1 then
                reason = 'rate'
                wake_at(ts + (1 - tokens) / lane.rate + 0.001)
                break
            end
        end
        if remaining <= 0 then
            break
        end
        redis.call('ZREM', lane.ready, head[1])
        if lane.rate > 0 then
            tokens = tokens - 1
        end
        if lane.concurrency > 0 then
            redis.call('ZADD', lane.leases, string.format('%.6f', clock + lane.lease), head[1])
        end
        redis.call('RPUSH', KEYS[3], head[1])
        local held = ''
        if tonumber(head[2]) <= blocked_at then
            held = state[4]
        end
        take(head[1], lane.name, held)
    end
    if lane.rate > 0 then
        redis.call('HSET', lane.state, 'tokens', string.format('%.6f', tokens),
                   'ts', string.format('%.6f', ts))
    end
    if reason then
        redis.call('HSET', lane.state, 'blocked_at', ARGV[1], 'reason', reason)
    end
    lane.blocked = reason
    lane.served = true
end
local sources = {}
for i, lane in ipairs(lanes) do
    sources[i] = lane
end
sources[#sources + 1] = {priority = tonumber(ARGV[12]), order = #lanes + 1}
table.sort(sources, function(a, b)
    if a.priority ~= b.priority then
        return a.priority > b.priority
    end
    return a.order < b.order
end)
for _, source in ipairs(sources) do
    if source.name then
        serve_lane(source)
    else
        serve_queued()
    end
end
for _, lane in ipairs(sources) do
    if lane.again then
        serve_lane(lane)
    end
end
for _, lane in ipairs(lanes) do
    if not lane.blocked then
        runnable = runnable + redis.call('ZCARD', lane.ready)
    end
end
local backlog = redis.call('LLEN', KEYS[2]) + runnable
if #due > 0 and backlog > 0 then
    redis.call('PUBLISH', ARGV[4], '0')
end
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], 1, '+inf', 'LIMIT', 0, 1, 'WITHSCORES')
if ARGV[5] ~= '1' then
    moved = {}
end
local wake_arg = false
if wake then
    wake_arg = string.format('%.6f', wake)
end
return {claimed, payloads, nxt[2] or false, backlog, #due / 2, moved, claimed_lanes, reasons,
        wake_arg}
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

# Lua for "take this due job out of the queue or lane it waits in, if it waits there":
# KEYS[2] is `queued`; LANES_ARGV = the lanes hash, the job id prefix, the lane key prefix
# (ARGV[LANES_ARGV], [+1], [+2] in the script that includes it).
_UNQUEUE_LUA = """
local function unqueue(id, at)
    if redis.call('LREM', KEYS[2], 0, id) > 0 then
        return true
    end
    local event = string.match(string.sub(id, #ARGV[at + 1] + 1), '^[^#]+')
    local lane = redis.call('HGET', ARGV[at], event)
    return lane and redis.call('ZREM', ARGV[at + 2] .. lane .. ':ready', id) > 0
end
"""

# Remove pending jobs that no worker has taken (a cancelled event's). KEYS = incomplete,
# queued, then the job ids; ARGV = the lanes hash, the job id prefix, the lane key prefix,
# then the job ids' keys (for the answer). A job scheduled (score >= 1) or queued (score 0,
# in `queued` or its lane's `ready`) is removed with its record and its event's lane mark
# (a cancelled event needs it no more; a retry command marks it again); a job taken by a
# worker (score 0, neither: claimed ahead or running) is left alone, the claim's
# compare-and-set in PostgreSQL stops it. Returns {removed keys, taken keys}.
REMOVE_LUA = (
    _UNQUEUE_LUA
    + """
local removed = {}
local taken = {}
for i = 3, #KEYS do
    local id = KEYS[i]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score then
        if tonumber(score) >= 1 or unqueue(id, 1) then
            redis.call('ZREM', KEYS[1], id)
            redis.call('DEL', id)
            redis.call('HDEL', ARGV[1], string.match(ARGV[i + 1], '^[^#]+'))
            removed[#removed + 1] = ARGV[i + 1]
        else
            taken[#taken + 1] = ARGV[i + 1]
        end
    end
end
return {removed, taken}
"""
)

# Put one job at a new due time: move it if it is pending and no worker has taken it, add
# it if it is not pending. KEYS = incomplete, queued, job id, abort id; ARGV = now, wake-up
# channel, payload (the job's record with its new `scheduled`), score (exact decimal
# string), the lanes hash, the job id prefix, the lane key prefix (a job waiting in its
# lane's `ready` is pending and untaken, as in `queued`), then the event id and its lane
# ('' for none). A job taken by a worker is left alone (its claim reads the due time from
# PostgreSQL: too early, it is put back at that time). Same due rule as ENQUEUE_LUA: a job
# already due goes straight to `queued` with score 0. A job with a lane marks its event
# (the mark may have been lost with Redis's data), as an enqueue does. Returns 'moved',
# 'added', 'taken' or 'aborting' (an abort of the key is in progress: nothing done, as for
# an enqueue).
PLACE_LUA = (
    _UNQUEUE_LUA
    + """
local score = redis.call('ZSCORE', KEYS[1], KEYS[3])
local result = 'added'
if score then
    if tonumber(score) < 1 and not unqueue(KEYS[3], 5) then
        return 'taken'
    end
    result = 'moved'
elseif redis.call('EXISTS', KEYS[4]) == 1 then
    return 'aborting'
end
if ARGV[9] ~= '' then
    redis.call('HSET', ARGV[5], ARGV[8], ARGV[9])
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
)
