-- ARGV[5]: a token to get; '' for every reservation; ARGV[6]: a service: its reservations;
-- ARGV[7]: '1' to get a token that ended less than ENDED_KEPT ms ago too
if ARGV[5] ~= '' then
  local r = get(RES, ARGV[5])
  if r == nil and ARGV[7] == '1' then
    r = get(ENDED, ARGV[5])
    if r and NOW - r.changed > ENDED_KEPT then r = nil end
  end
  return answer({r = r})
end
if ARGV[6] == '' then return answer({rs = decoded(redis.call('HVALS', RES))}) end
local suffix, out = '	' .. ARGV[6], {}
for _, field in ipairs(redis.call('HKEYS', USED)) do
  if string.sub(field, -#suffix) == suffix then
    for _, token in pairs(cjson.decode(redis.call('HGET', USED, field))) do
      local r = get(RES, token)
      if r then out[#out + 1] = r end
    end
  end
end
return answer({rs = out})
