-- ARGV[5..6]: token, the job (JSON): record it in the reservation and index its id;
-- or ARGV[5] '' and ARGV[6] a job id: the live reservation whose job it is
if ARGV[5] == '' then
  local token = redis.call('HGET', JOBS, ARGV[6])
  if token then return answer({r = get(RES, token)}) end
  return answer({})
end
if stale() then return answer({error = 'stale'}) end
local r = get(RES, ARGV[5])
if r == nil then return answer({}) end
r.job = cjson.decode(ARGV[6])
put(r)
redis.call('HSET', JOBS, tostring(r.job.job_id), r.token)
return answer({r = r})
