-- ARGV[5..7]: seconds (ms) a reservation may stay unused, at most how many to end, why.
-- Answers them as they were; also forgets the reservations ended ENDED_KEPT ms ago.
if stale() then return answer({error = 'stale'}) end
local out = {}
for _, token in ipairs(redis.call('ZRANGEBYSCORE', IDLE, '-inf', NOW - tonumber(ARGV[5]),
                                  'LIMIT', 0, tonumber(ARGV[6]))) do
  local r = get(RES, token)
  if r and r.state == UNSTARTED then
    out[#out + 1] = r
    finish(get(RES, token), ARGV[7])
  else  -- not unused any more (the index is kept by put(): only a stray entry)
    redis.call('ZREM', IDLE, token)
  end
end
for _, token in ipairs(redis.call('ZRANGEBYSCORE', ENDED_AT, '-inf', NOW - ENDED_KEPT,
                                  'LIMIT', 0, 1000)) do
  redis.call('HDEL', ENDED, token)
  redis.call('ZREM', ENDED_AT, token)
end
return answer({rs = out})
