-- POST prebuilt JSON bodies and, when wrk ends, print one machine-readable line.
--
-- Usage: wrk -t1 -cC -dDs --latency -s bench/wrk/post_json.lua URL -- BODY_FILE
-- BODY_FILE holds one JSON body per line (written by bench.load.write_bodies). With one line wrk sends the same
-- prebuilt request every time and runs no Lua per request (a request() callback costs wrk CPU on the cores it
-- shares with the server); with several, request() hands out the next of them, each formatted once, round robin.
-- done() prints "WRK_JSON {...}": requests, bytes, duration, errors by kind and latency percentiles, all in
-- microseconds. wrk counts a response with status > 399 as a "status" error.

local prebuilt = {}
local cursor = 0

function init(args)
  local path = args[1]
  if path == nil then
    error("usage: ... -s post_json.lua URL -- BODY_FILE")
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  local bodies = {}
  for line in io.lines(path) do
    if line ~= "" then
      bodies[#bodies + 1] = line
    end
  end
  if #bodies == 0 then
    error(path .. ": no request bodies")
  end
  if #bodies == 1 then
    wrk.body = bodies[1]
    return
  end
  for i, body in ipairs(bodies) do
    prebuilt[i] = wrk.format(nil, nil, nil, body)
  end
  request = function()
    cursor = cursor % #prebuilt + 1
    return prebuilt[cursor]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"bytes":%d', summary.bytes),
    string.format('"duration_us":%d', summary.duration),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}',
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)),
  }
  io.write("WRK_JSON {" .. table.concat(parts, ",") .. "}\n")
end
