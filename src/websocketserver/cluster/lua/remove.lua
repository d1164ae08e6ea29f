-- ARGV[5..6]: token, why it ends. Answers the reservation as it was before it ended.
if stale() then return answer({error = 'stale'}) end
local r = get(RES, ARGV[5])
if r then finish(get(RES, ARGV[5]), ARGV[6]) end
return answer({r = r})
