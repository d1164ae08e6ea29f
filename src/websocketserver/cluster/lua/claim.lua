-- ARGV[5..7]: token, user (JSON), operation id
if stale() then return answer({error = 'stale'}) end
local r = get(RES, ARGV[5])
if r == nil then return answer({outcome = 'unknown'}) end
if r.op == ARGV[7] and r.node == ME then  -- a retried call that was applied
  for _, rule in pairs(CLAIMS) do
    if rule[1] == r.state then return answer({outcome = rule[2], r = r}) end
  end
end
local user = cjson.decode(ARGV[6])
if r.owner ~= cjson.null and user ~= cjson.null and user ~= r.owner then
  return answer({outcome = 'not owner', r = r})
end
local rule = CLAIMS[r.state]
if rule == nil then return answer({outcome = 'in use', r = r}) end
if r.node ~= ME then
  local count = get(NODES, ME).counts[r.service]
  local index = nil
  if rule[3] and count then
    if r.scope == 'cluster' then
      index = r.index
    else
      index = lowest_free((held(r.service, ME)), count)
    end
  end
  if index == nil then return answer({outcome = 'elsewhere', r = r}) end
  mark(r, nil)
  r.node, r.index = ME, index
  mark(r, r.token)
end
r.state, r.changed, r.by, r.op, r.ran = rule[1], NOW, ME, ARGV[7], true
put(r)
return answer({outcome = rule[2], r = r})
