-- Paced keep-alive load for wrk (bench/rate_sweep.py --loadgen wrk):
--   wrk -t1 -c<connections> -d8s -s bench/wrk/delay.lua http://127.0.0.1:<port>/ -- <delay_ms>
-- Every connection waits <delay_ms> before each request (counted from the previous response), so the request
-- rate is at most connections * 1000 / delay_ms. wrk's delay() takes whole milliseconds and its timers fire on
-- the next millisecond tick of its event loop, so the real gap is delay + ~1 ms + the response time: the
-- achieved rate falls short of the nominal one (see docs/overhead.md, "Request capture").
local delay_ms = 10

function init(args)
   if args[1] then
      delay_ms = tonumber(args[1])
   end
end

function delay()
   return delay_ms
end
