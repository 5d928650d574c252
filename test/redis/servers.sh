#!/usr/bin/env bash
# Starts and stops the Redis servers kvtier's remote-tier tests use, on loopback, free ports.
#   servers.sh start-single DIR     one server; its port in DIR/single.port
#   servers.sh start-cluster DIR    a three-master Redis Cluster; ports in DIR/cluster.ports
#   servers.sh stop-single DIR      stops the single server (keeps its port for a restart)
#   servers.sh restart-single DIR   starts the single server again on the same port
#   servers.sh pause-single DIR     freezes the single server (SIGSTOP): a hung server
#   servers.sh resume-single DIR    thaws it (SIGCONT)
#   servers.sh stop DIR             stops every server started in DIR
set -euo pipefail
cmd=$1
dir=$2
mkdir -p "$dir"
server=$(command -v redis-server || command -v valkey-server)
cli=$(command -v redis-cli || command -v valkey-cli)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_up() {
  for _ in $(seq 200); do
    "$cli" -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "redis-server on port $1 did not start" >&2
  exit 1
}
launch() {  # port name [extra args...]
  local port=$1 name=$2
  shift 2
  "$server" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/$name.pid" --logfile "$dir/$name.log" "$@"
  wait_up "$port"
}
stop_pid() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  kill -CONT "$pid" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  # Gone, or a zombie (a daemon's parent may be a PID 1 that does not reap it).
  for _ in $(seq 100); do
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    [ -z "$state" ] || [ "${state#Z}" != "$state" ] && break
    sleep 0.05
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

case "$cmd" in
  start-single)
    port=$(free_port)
    echo "$port" >"$dir/single.port"
    launch "$port" single
    ;;
  stop-single)
    stop_pid "$dir/single.pid"
    ;;
  pause-single)
    kill -STOP "$(cat "$dir/single.pid")"
    ;;
  resume-single)
    kill -CONT "$(cat "$dir/single.pid")"
    ;;
  restart-single)
    launch "$(cat "$dir/single.port")" single
    ;;
  start-cluster)
    ports=()
    for i in 0 1 2; do
      p=$(free_port)
      bus=$(free_port)
      ports+=("$p")
      rm -f "$dir/nodes-$p.conf"
      launch "$p" "cluster-$i" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
        --cluster-port "$bus" --cluster-node-timeout 5000
    done
    "$cli" --cluster create "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" \
      "127.0.0.1:${ports[2]}" --cluster-replicas 0 --cluster-yes >"$dir/cluster-create.log" 2>&1
    for p in "${ports[@]}"; do
      for _ in $(seq 200); do
        "$cli" -p "$p" cluster info 2>/dev/null | grep -q "cluster_state:ok" && break
        sleep 0.05
      done
    done
    echo "${ports[*]}" >"$dir/cluster.ports"
    ;;
  stop)
    for f in "$dir"/*.pid; do stop_pid "$f"; done
    ;;
  *)
    echo "usage: servers.sh start-single|stop-single|restart-single|start-cluster|stop DIR" >&2
    exit 2
    ;;
esac
