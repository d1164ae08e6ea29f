-- ARGV[5..8]: nonce, the forward's time (Redis ms), how long it is valid, how far ahead
local at = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', NONCES, '-inf', NOW)
if at == nil or NOW - at > tonumber(ARGV[7]) or at - NOW > tonumber(ARGV[8]) then
  return answer({fresh = false, expired = true})
end
return answer({fresh = redis.call('ZADD', NONCES, 'NX', at + tonumber(ARGV[7]), ARGV[5]) == 1})
