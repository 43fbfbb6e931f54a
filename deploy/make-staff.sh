#!/usr/bin/env bash
# The central station's staff logins: ./make-staff.sh FILE LOGIN... (asks for each password; stored as scrypt
# hashes, the file readable by its owner only: give it to the station's user). Run again to add logins or change a
# password; a login is removed by deleting its line.
set -euo pipefail
file=$1; shift
for login in "$@"; do ecgmon station-user --users-file "$file" "$login"; done
