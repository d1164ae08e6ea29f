-- The tokens whose sessions this instance adopts (evict moved them here), taken once.
if stale() then return answer({error = 'stale'}) end
local key = PREFIX .. 'adopt:' .. ME
local tokens = redis.call('HVALS', key)
for _, token in ipairs(tokens) do redis.call('HDEL', key, token) end
return answer({tokens = tokens})
