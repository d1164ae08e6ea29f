if stale() then return answer({error = 'stale'}) end
redis.call('HDEL', NODES, ME)
evict(ME)
return answer({})
