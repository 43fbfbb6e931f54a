#!/usr/bin/env bash
# Create the password file: ./make-passwords.sh FILE USER... (asks for each password; mosquitto_passwd from Debian's mosquitto)
# One login per client: the broker uses the user name as client id, so two clients sharing a login throw each other off.
# mosquitto must be able to read FILE: the Debian drop-in and compose.yaml see to that (docs/deploy.md).
set -euo pipefail
file=$1; shift
touch "$file"
for user in "$@"; do mosquitto_passwd "$file" "$user"; done
chmod 600 "$file"
