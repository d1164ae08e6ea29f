-- ARGV[5]: the generation this instance registered in
if stale() then
  if redis.call('HGET', META, 'generation') ~= ARGV[5] then return answer({error = 'lost'}) end
  return answer({error = 'stale'})
end
forgive_outage()
local me = get(NODES, ME)
me.seen = NOW
put_node(me)
for _, n in ipairs(decoded(redis.call('HVALS', NODES))) do
  if NOW - n.seen >= 2 * n.ttl then
    redis.call('HDEL', NODES, n.name)
    evict(n.name)
  end
end
return answer({})
