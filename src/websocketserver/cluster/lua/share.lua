-- ARGV[5..7]: 'add', token, mode (answers the new share token, ARGV[8]); 'find', share;
-- 'remove', share. A reservation's shares: r.shares (share token -> mode).
local op = ARGV[5]
if op == 'find' then
  local token = redis.call('HGET', SHARES, ARGV[6])
  if token then return answer({r = get(RES, token)}) end
  return answer({})
end
if stale() then return answer({error = 'stale'}) end
if op == 'add' then
  local r = get(RES, ARGV[6])
  if r == nil then return answer({}) end
  if r.shares == nil or next(r.shares) == nil then r.shares = {} end
  r.shares[ARGV[8]] = ARGV[7]
  put(r)
  redis.call('HSET', SHARES, ARGV[8], r.token)
  return answer({r = r})
end
local token = redis.call('HGET', SHARES, ARGV[6])
redis.call('HDEL', SHARES, ARGV[6])
local r = token and get(RES, token)
if not r then return answer({}) end
if r.shares then r.shares[ARGV[6]] = nil end
put(r)
-- its viewers are on the session's instance: tell it, as a release does
if r.node ~= ME then redis.call('PUBLISH', CHANNEL .. r.node, ARGV[6]) end
return answer({r = r})
