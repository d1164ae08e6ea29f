-- Shared head of every script (redis_store.py fills in the %%(...)s values).
-- KEYS: nodes, res, meta, nonces, used, idle. ARGV: this instance's name, its epoch,
-- the heartbeat TTL (ms), the stop channel prefix; the script's own from ARGV[5].
local NODES, RES, META, NONCES, USED, IDLE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6]
local PREFIX = string.sub(NODES, 1, #NODES - #'nodes')
-- ended reservations, readable for ENDED_KEPT ms: token -> record, and when each ended
local ENDED, ENDED_AT = PREFIX .. 'ended', PREFIX .. 'ended_at'
-- the Slurm jobs of live reservations: job id -> token; their share tokens -> token
local JOBS, SHARES = PREFIX .. 'jobs', PREFIX .. 'shares'
local ME, EPOCH, TTL, CHANNEL = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local CLAIMS = cjson.decode(%(claims)s)
local MOVES = cjson.decode(%(moves)s)  -- lifecycle.py's table: state -> states it may move to
local UNSTARTED, STOPPING, ENDED_STATE = %(unstarted)s, %(stopping)s, %(ended)s
local ACTIVE, DETACHED = %(active)s, %(detached)s
local ENDED_KEPT = %(ended_kept)d
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function decoded(values)
  local out = {}
  for i, value in ipairs(values) do out[i] = cjson.decode(value) end
  return out
end
local function get(hash, field)
  local raw = redis.call('HGET', hash, field)
  if raw then return cjson.decode(raw) end
  return nil
end
-- the sessions of `node` that another instance is stopping
local function stops(node) return PREFIX .. 'stops:' .. node end
-- what a page sees of `r` (reservations.py's seen()): a change is an event
local function seen(r)
  local j = r.job or {}
  local values = {r.state, r.node, j.queue_reason, j.expected_start, j.job_node}
  local out = {}
  for i = 1, 5 do  -- not ipairs: it stops at the first nil
    local value = values[i]
    if value == nil or value == cjson.null then out[i] = '' else out[i] = tostring(value) end
  end
  return table.concat(out, '\t')
end
-- one more change for the pages watching r.token (its seq, the `changes` channel)
local function changed(r)
  r.seq = (r.seq or 0) + 1
  redis.call('PUBLISH', PREFIX .. 'changes', r.token)
end
local function put(r)
  local old = get(RES, r.token)
  r.seq = (old and old.seq) or r.seq or 0
  if old == nil or seen(old) ~= seen(r) then changed(r) end
  redis.call('HSET', RES, r.token, cjson.encode(r))
  if r.state == UNSTARTED then
    redis.call('ZADD', IDLE, r.changed, r.token)
  else
    redis.call('ZREM', IDLE, r.token)
  end
end
local function put_node(n) redis.call('HSET', NODES, n.name, cjson.encode(n)) end
local function answer(t)
  t.now = NOW
  return cjson.encode(t)
end
local function live(n) return NOW - n.seen < n.ttl end
local function stale()
  local me = get(NODES, ME)
  return me == nil or me.epoch ~= EPOCH
end

-- the slots of `service` that node `name` holds: {index (text): token}
local function slots(name, service)
  local raw = redis.call('HGET', USED, name .. '	' .. service)
  if raw then return cjson.decode(raw) end
  return {}
end
-- note in USED that `r` holds its slot (token: r.token) or no longer does (nil)
local function mark(r, token)
  local field, key = r.node .. '	' .. r.service, tostring(r.index)
  local used = slots(r.node, r.service)
  if token == nil and used[key] ~= r.token then return end
  used[key] = token
  if next(used) == nil then
    redis.call('HDEL', USED, field)
  else
    redis.call('HSET', USED, field, cjson.encode(used))
  end
end
-- whether the lifecycle table allows `old` -> `new`
local function legal(old, new)
  for _, state in ipairs(MOVES[old] or {}) do
    if state == new then return true end
  end
  return false
end
-- take `r` out of the live reservations: its record, its slot, its index entries
local function forget(r)
  if r.job then redis.call('HDEL', JOBS, tostring(r.job.job_id)) end
  for share in pairs(r.shares or {}) do redis.call('HDEL', SHARES, share) end
  redis.call('HDEL', RES, r.token)
  redis.call('ZREM', IDLE, r.token)
  redis.call('HDEL', stops(r.node), r.token)
  mark(r, nil)
end
-- end `r` for `reason`: forgotten, and readable as ended for ENDED_KEPT ms
local function finish(r, reason)
  forget(r)
  r.state, r.changed, r.end_reason = ENDED_STATE, NOW, reason
  changed(r)
  redis.call('HSET', ENDED, r.token, cjson.encode(r))
  redis.call('ZADD', ENDED_AT, NOW, r.token)
end
-- indices of `service` held on node `name` (on every node of `nodes` if nil), and how many
local function held(service, name, nodes)
  local names = {name}
  if name == nil then
    for i, n in ipairs(nodes) do names[i] = n.name end
  end
  local used, count = {}, 0
  for _, node in ipairs(names) do
    for index in pairs(slots(node, service)) do
      used[tonumber(index)] = true
      count = count + 1
    end
  end
  return used, count
end
local function lowest_free(used, count)
  for i = 0, count - 1 do
    if not used[i] then return i end
  end
  return nil
end

-- The node for a reservation of `service`: the least-loaded live node that runs it
-- and has room, ties to this node, then by name. Returns the node and its lowest free
-- index (nil for a cluster-scoped service, whose index is cluster-wide).
local function place(nodes, service, scope)
  local best, best_index, best_load, best_rank
  for _, n in ipairs(nodes) do
    local count = n.counts[service]
    if count and live(n) then
      local used, load = held(service, n.name)
      local index = nil
      if scope ~= 'cluster' then index = lowest_free(used, count) end
      local rank = (n.name == ME) and '' or n.name
      if (scope == 'cluster' or index ~= nil) and (best == nil or load < best_load
          or (load == best_load and rank < best_rank)) then
        best, best_index, best_load, best_rank = n.name, index, load, rank
      end
    end
  end
  return best, best_index
end

-- Node `name` is gone (its registration already deleted or replaced): forget its
-- sessions (they ended with it) and what it began to release but did not finish, and
-- move its never-used reservations to live nodes with room (drop them if none has).
-- A session with a Slurm job moves too, its job being the cluster's: the node it moves
-- to adopts it (adopt:<node>); its websocket went with the instance (active: detached).
local function evict(name)
  local moving = {}
  for _, r in ipairs(decoded(redis.call('HVALS', RES))) do
    if r.node == name and (r.state == UNSTARTED or (r.job and r.state ~= STOPPING)) then
      forget(r)
      moving[#moving + 1] = r
    elseif r.node == name then
      finish(r, 'instance ' .. name .. ' is gone')
    elseif r.by == name and r.state == STOPPING and not r.ran then
      finish(r, 'released')
    end
  end
  local nodes = decoded(redis.call('HVALS', NODES))
  for _, r in ipairs(moving) do
    local target, index = place(nodes, r.service, r.scope)
    if target then
      r.node = target
      if index ~= nil then r.index = index end
      if r.state ~= UNSTARTED then
        if r.state == ACTIVE then r.state, r.changed = DETACHED, NOW end
        redis.call('HSET', JOBS, tostring(r.job.job_id), r.token)
        redis.call('HSET', PREFIX .. 'adopt:' .. target, r.token, r.token)
      end
      put(r)
      mark(r, r.token)
    else
      r.node = name
      finish(r, 'instance ' .. name .. ' is gone and no other has room')
    end
  end
end

-- No instance reached Redis for over TTL / 2 (Redis down, or cut off from all): that
-- time is nobody's silence, so every node's last beat moves forward by it. Run first
-- by every script that judges who is live.
local function forgive_outage()
  local last = tonumber(redis.call('HGET', META, 'contact'))
  if last and NOW - last > TTL / 2 then
    for _, n in ipairs(decoded(redis.call('HVALS', NODES))) do
      n.seen = n.seen + (NOW - last)
      put_node(n)
    end
  end
  redis.call('HSET', META, 'contact', NOW)
end
