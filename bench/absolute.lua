-- wrk script for bench/compare.sh.
--
-- With WRK_TARGET=host:port set, wrk talks to a forward proxy: it connects to the URL given on
-- its command line (the proxy) and sends absolute-form request lines
--     GET http://WRK_TARGET/ HTTP/1.1
--     Host: WRK_TARGET
-- Without WRK_TARGET it sends ordinary origin-form requests (the direct baseline).
--
-- done() prints one machine-readable line (the table in compare.sh is built from it, not from
-- wrk's human summary). Latencies are in microseconds.

local target = os.getenv("WRK_TARGET")
if target and target ~= "" then
  wrk.path = "http://" .. target .. "/"
  wrk.headers["Host"] = target
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    "EPBENCH requests=%d duration_s=%.3f rps=%.1f p50_us=%.1f p90_us=%.1f p99_us=%.1f " ..
    "max_us=%.1f bytes=%d err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
end
