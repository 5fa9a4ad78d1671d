# Sourced by the benchmark scripts: env_for_mock ADDR points every provider's real
# adapter at `ticketflow mock-provider` listening on ADDR, with a planted key and
# limits too high to matter (a script lowers the one it measures afterwards).
env_for_mock() {
  local addr=$1
  export BENCH_KEY=sk-bench
  for p in qwen:dashscope openai:openai anthropic:anthropic mistral:openai deepseek:openai; do
    local name=${p%%:*} kind=${p##*:} upper
    upper=$(echo "$name" | tr a-z A-Z)
    export "TICKETFLOW__PROVIDERS__${upper}__KIND=$kind"
    export "TICKETFLOW__PROVIDERS__${upper}__BASE_URL=http://$addr/$name/v1"
    export "TICKETFLOW__PROVIDERS__${upper}__API_KEY_ENV=BENCH_KEY"
    export "TICKETFLOW__PROVIDERS__${upper}__REQUESTS_PER_MINUTE=10000000"
    export "TICKETFLOW__PROVIDERS__${upper}__TOKENS_PER_MINUTE=10000000000"
  done
}
