#!/usr/bin/env bash
# Logins and permissions of the ecgmon RabbitMQ cluster, the counterpart of deploy/mosquitto/acl:
#   ./make-users.sh daemon NAME          a daemon (AMQP: its partitions, checkpoints, heartbeats and results)
#   ./make-users.sh device NAME...       sensors: each publishes ECG on its own topic only, reads its own rejections
#   ./make-users.sh station NAME...      pagers, dashboards: read alarms, open alarms (asking for them on
#                                        ecgmon/query/active), beats, status
#   ./make-users.sh central NAME         the central station (`ecgmon station`): that, with ECG and rejections, and
#                                        it sends the staff's acknowledgements on ecgmon/acks/<device>
#   ./make-users.sh ops NAME...          operations: rejections, open alarms, status, stats
# Asks for each password. Run on one node (users and permissions are cluster-wide); RABBITMQCTL overrides the
# command (e.g. "docker compose exec rabbit1 rabbitmqctl"). Topic permissions apply to amq.topic, where the MQTT
# plugin maps ecgmon/ecg/<device> to the routing key ecgmon.ecg.<device>.
set -euo pipefail
rabbitmqctl=${RABBITMQCTL:-rabbitmqctl}
ctl() { $rabbitmqctl "$@" </dev/null; }  # rabbitmqctl would read the passwords still to come on stdin
role=$1; shift
# Resources: MQTT clients use amq.topic and their own session queues; daemons publish to amq.topic, declare ecgmon.*
# (partitions, checkpoints, the consistent-hash exchange) and a server-named queue for the heartbeats, which also
# hears the cluster's events (amq.rabbitmq.event: a daemon whose connection closed).
mqtt_only='^(amq\.topic|mqtt-subscription-.*)$'
daemon='^(amq\.topic|amq\.default|amq\.gen-.*|ecgmon\..*)$'  # amq.default: checkpoints go to their queue
daemon_read='^(amq\.topic|amq\.default|amq\.gen-.*|amq\.rabbitmq\.event|ecgmon\..*)$'
for user in "$@"; do
  read -rsp "password for $user: " password && echo
  [ -n "$password" ] || { echo "no password for $user" >&2; exit 2; }
  ctl add_user "$user" "$password" >/dev/null 2>&1 || ctl change_password "$user" "$password"
  case $role in
    daemon)
      ctl set_permissions "$user" "$daemon" "$daemon" "$daemon_read"
      ctl set_topic_permissions "$user" amq.topic \
        '^ecgmon\.(beats|alarms|errors|active|status|stats|daemons)(\..*)?$' '^ecgmon\.(ecg|daemons|query|acks)(\..*)?$' ;;
    device)
      ctl set_permissions "$user" '^mqtt-subscription-.*$' "$mqtt_only" "$mqtt_only"
      ctl set_topic_permissions "$user" amq.topic '^ecgmon\.ecg\.{username}$' '^ecgmon\.errors\.{username}$' ;;
    station)
      ctl set_permissions "$user" '^mqtt-subscription-.*$' "$mqtt_only" "$mqtt_only"
      ctl set_topic_permissions "$user" amq.topic '^ecgmon\.query\.active$' '^ecgmon\.(alarms|active|beats|status|stats)(\..*)?$' ;;
    central)
      ctl set_permissions "$user" '^mqtt-subscription-.*$' "$mqtt_only" "$mqtt_only"
      ctl set_topic_permissions "$user" amq.topic '^ecgmon\.(query\.active|acks\..*)$' \
        '^ecgmon\.(ecg|alarms|active|beats|errors|status|stats)(\..*)?$' ;;
    ops)
      ctl set_permissions "$user" '^mqtt-subscription-.*$' "$mqtt_only" "$mqtt_only"
      ctl set_topic_permissions "$user" amq.topic '^ecgmon\.query\.active$' '^ecgmon\.(errors|active|status|stats)(\..*)?$' ;;
    *) echo "unknown role $role (daemon, device, station, central, ops)" >&2; exit 2 ;;
  esac
done
