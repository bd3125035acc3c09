#!/usr/bin/env bash
# `make run`: meshd on its embedded demo config, a stock Envoy gateway started
# from `meshd bootstrap`, and the demo backend, in the foreground until Ctrl-C.
set -euo pipefail

MESHD=${MESHD:-target/debug/meshd}
ENVOY=${ENVOY:-.venv/bin/envoy}
GATEWAY_PORT=8080   # the demo Service maps Gateway port 80 to targetPort 8080
BACKEND_PORT=9080   # where the demo Endpoints point
ADMIN_PORT=15000
work=$(mktemp -d)
pids=()

stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop INT TERM EXIT

wait_for() { # wait_for WHAT COMMAND...: poll up to 30 s
  local what=$1; shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: $what did not come up; logs are in $work" >&2
  trap - EXIT; exit 1
}

for port in $GATEWAY_PORT $BACKEND_PORT $ADMIN_PORT 15010 15012 15014 15017; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is in use; stop what listens there first" >&2; exit 1
  fi
done

python3 scripts/hello_backend.py --port $BACKEND_PORT &
pids+=($!)
"$MESHD" serve 2>"$work/meshd.log" &
pids+=($!)
wait_for "meshd" curl -sf http://127.0.0.1:15014/ready

"$MESHD" bootstrap --role gateway --name istio-ingressgateway-demo --namespace istio-system \
  --labels istio=ingressgateway --service-account istio-ingressgateway-service-account \
  --admin-addr 127.0.0.1:$ADMIN_PORT -o "$work/envoy.yaml"
"$ENVOY" -c "$work/envoy.yaml" --base-id 3179 -l warning 2>"$work/envoy.log" &
pids+=($!)

url="http://127.0.0.1:$GATEWAY_PORT/"
wait_for "the Envoy gateway" curl -sf -H 'Host: helloworld.fireflyclass.com' "$url"

echo "meshd, a stock Envoy gateway and the helloworld backend are running (logs: $work)."
echo "Debug endpoints: http://127.0.0.1:15014/debug/syncz and /debug/configz. Ctrl-C stops all three."
echo
echo "curl -H 'Host: helloworld.fireflyclass.com' $url"
wait -n "${pids[@]}"
echo "demo: a process exited; stopping" >&2
