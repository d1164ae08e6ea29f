-- ARGV[5..10]: address, counts (JSON), registration id, the secret's check value, the
-- entry's signature, this instance's sessions to register again (JSON list: after Redis
-- lost its data, else empty)
local old = get(NODES, ME)
if old and old.rid == ARGV[7] then
  return answer({epoch = old.epoch, generation = redis.call('HGET', META, 'generation')})
end
if old and live(old) and old.epoch ~= EPOCH then
  return answer({error = 'duplicate', address = old.address})
end
forgive_outage()
local check = redis.call('HGET', META, 'secret')
if check and check ~= ARGV[8] then
  for _, n in ipairs(decoded(redis.call('HVALS', NODES))) do
    if n.name ~= ME and live(n) then return answer({error = 'secret', node = n.name}) end
  end
end
redis.call('HSET', META, 'secret', ARGV[8])
if not redis.call('HGET', META, 'generation') then
  redis.call('HSET', META, 'generation', ARGV[7])
end
if not redis.call('HGET', META, 'used') then  -- kept from now on
  for _, r in ipairs(decoded(redis.call('HVALS', RES))) do mark(r, r.token) end
  redis.call('HSET', META, 'used', 1)
end
if not redis.call('HGET', META, 'idle') then  -- kept from now on
  for _, r in ipairs(decoded(redis.call('HVALS', RES))) do put(r) end
  redis.call('HSET', META, 'idle', 1)
end
local epoch = redis.call('HINCRBY', META, 'epoch', 1)
put_node({name = ME, epoch = epoch, address = ARGV[5], counts = cjson.decode(ARGV[6]),
          ttl = TTL, seen = NOW, rid = ARGV[7], sig = ARGV[9]})
if old then evict(ME) end
local nodes = decoded(redis.call('HVALS', NODES))
local refused = {}
for _, r in ipairs(cjson.decode(ARGV[10])) do
  local taken = get(RES, r.token) ~= nil
  if not taken then
    local used = held(r.service, r.scope == 'cluster' and nil or ME, nodes)
    taken = used[r.index] ~= nil
  end
  if taken then
    refused[#refused + 1] = r.token
  else
    r.node, r.by, r.changed = ME, ME, NOW
    put(r)
    mark(r, r.token)
  end
end
return answer({epoch = epoch, generation = redis.call('HGET', META, 'generation'),
               refused = refused})
