-- wrk script for bench/switching.sh: counts responses by status and by which
-- backend produced the body ("blue ..." / "green..."), summed over threads.
-- Prints one line "LUA blue=N green=N other=N non2xx=N" that benchtool parses.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   blue, green, other, non2xx = 0, 0, 0, 0
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   if body == nil then
      other = other + 1
   elseif string.sub(body, 1, 5) == "blue " then
      blue = blue + 1
   elseif string.sub(body, 1, 5) == "green" then
      green = green + 1
   else
      other = other + 1
   end
end

function done(summary, latency, requests)
   local b, g, o, n = 0, 0, 0, 0
   for _, t in ipairs(threads) do
      b = b + (t:get("blue") or 0)
      g = g + (t:get("green") or 0)
      o = o + (t:get("other") or 0)
      n = n + (t:get("non2xx") or 0)
   end
   io.write(string.format("LUA blue=%d green=%d other=%d non2xx=%d\n", b, g, o, n))
end
