-- POST one fixed JSON body on every request and, when wrk ends, print one machine-readable line.
--
-- Usage: wrk -t1 -cC -dDs --latency -s bench/wrk/post_json.lua URL -- BODY_FILE
-- The body is read once from BODY_FILE (written by bench.frontend), so wrk sends prebuilt requests and spends
-- no Lua per request: no request() or response() callback, which would cost wrk CPU on the shared cores.
-- done() prints "WRK_JSON {...}": requests, bytes, duration, errors by kind and latency percentiles, all in
-- microseconds. wrk counts a response with status > 399 as a "status" error (there are no 3xx here).

local body_file = nil

function init(args)
  body_file = args[1]
  if body_file == nil then
    error("usage: ... -s post_json.lua URL -- BODY_FILE")
  end
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"bytes":%d', summary.bytes),
    string.format('"duration_us":%d', summary.duration),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d}',
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)),
  }
  io.write("WRK_JSON {" .. table.concat(parts, ",") .. "}\n")
end
