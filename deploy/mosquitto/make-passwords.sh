#!/usr/bin/env bash
# Create the password file: ./make-passwords.sh FILE USER... (asks for each password; mosquitto_passwd from Debian's mosquitto)
set -euo pipefail
file=$1; shift
touch "$file"
for user in "$@"; do mosquitto_passwd "$file" "$user"; done
chmod 600 "$file"
