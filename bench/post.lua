-- wrk script: the same chat completion request the other measurements send.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_KEY") and os.getenv("BENCH_KEY") ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
end
wrk.body = os.getenv("BENCH_BODY")
