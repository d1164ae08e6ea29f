-- ARGV[5]: one instance's name, or '' for every instance
if ARGV[5] ~= '' then return answer({n = get(NODES, ARGV[5])}) end
return answer({nodes = decoded(redis.call('HVALS', NODES))})
