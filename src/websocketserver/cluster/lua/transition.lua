-- ARGV[5..8]: token, expected states (comma-separated), new state, operation id
for state in string.gmatch(ARGV[6], '[^,]+') do
  if not legal(state, ARGV[7]) then return answer({error = 'illegal'}) end
end
if stale() then return answer({error = 'stale'}) end
local r = get(RES, ARGV[5])
if r == nil then return answer({}) end
if r.op == ARGV[8] and r.by == ME and r.state == ARGV[7] then return answer({r = r}) end
local allowed = false
for state in string.gmatch(ARGV[6], '[^,]+') do
  if state == r.state then allowed = true end
end
if not allowed then return answer({}) end
r.state, r.changed, r.by, r.op = ARGV[7], NOW, ME, ARGV[8]
put(r)
if r.state == STOPPING and r.ran and r.node ~= ME then
  redis.call('HSET', stops(r.node), r.token, r.token)
  redis.call('PUBLISH', CHANNEL .. r.node, r.token)
end
return answer({r = r})
