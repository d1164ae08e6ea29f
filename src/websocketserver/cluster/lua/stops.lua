return answer({tokens = redis.call('HVALS', stops(ME))})
