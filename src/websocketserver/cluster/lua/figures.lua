-- ARGV[5]: JSON {token: figures (JSON text, kept as it is: cjson would turn an empty
-- array into an object)}; each is written into its live reservation if that is this
-- instance's. Not a change a page sees: no seq, no announcement.
if stale() then return answer({error = 'stale'}) end
for token, figures in pairs(cjson.decode(ARGV[5])) do
  local r = get(RES, token)
  if r and r.node == ME then
    r.figures = figures
    redis.call('HSET', RES, token, cjson.encode(r))
  end
end
return answer({})
