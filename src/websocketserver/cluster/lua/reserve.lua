-- ARGV[5..10]: token, service, count, scope, options (JSON text), owner (JSON)
if stale() then return answer({error = 'stale'}) end
local token, service, count, scope = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local existing = get(RES, token)
if existing then return answer({r = existing}) end  -- a retried call that was applied
forgive_outage()
local nodes = decoded(redis.call('HVALS', NODES))
local index = nil
if scope == 'cluster' then
  index = lowest_free((held(service, nil, nodes)), count)
  if index == nil then return answer({error = 'full'}) end
end
local node, slot = place(nodes, service, scope)
if node == nil then return answer({error = 'full'}) end
local r = {token = token, service = service, scope = scope, node = node,
           index = index or slot, state = UNSTARTED, owner = cjson.decode(ARGV[10]),
           options = ARGV[9], timestamp = NOW, changed = NOW, by = ME, op = '', ran = false}
put(r)
mark(r, r.token)
return answer({r = r})
