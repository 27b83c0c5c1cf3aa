#!/usr/bin/env bash
# TLS certificates for a SuperLink and authentication keys for its SuperNodes (Flower's deployment engine).
#
#   scripts/make_certificates.sh OUT_DIR [--nodes N] [--days D] [HOST ...]
#
# OUT_DIR/ca.crt, ca.key           a private certificate authority (keep ca.key away from the clients)
# OUT_DIR/server.pem, server.key   the SuperLink's certificate, valid for localhost, 127.0.0.1 and every HOST
#                                  given (the names and addresses SuperNodes use to reach it)
# OUT_DIR/supernodes/client_<i>    with --nodes N: one ECDSA key pair per SuperNode (client_<i>.pub is
#                                  registered with the SuperLink; client_<i> stays on that node)
# Needs openssl and ssh-keygen. Existing files are never overwritten.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [--nodes N] [--days D] [HOST ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
nodes=0; days=365; hosts=()
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
    --days) days=${2:?--days needs a number}; shift 2 ;;
    -*) usage ;;
    *) hosts+=("$1"); shift ;;
  esac
done
for tool in openssl ssh-keygen; do
  command -v $tool >/dev/null || { echo "error: $tool not found (apt-get install openssl openssh-client)" >&2; exit 1; }
done
mkdir -p "$out"
for f in ca.crt ca.key server.pem server.key; do
  [ ! -e "$out/$f" ] || { echo "error: $out/$f exists; choose another OUT_DIR or remove the old files" >&2; exit 1; }
done

san="DNS:localhost,IP:127.0.0.1"
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done

umask 077
openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" -subj "/CN=fedhubert CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=${hosts[0]:-localhost}" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
  -sha256 -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san") \
  -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"

if [ "$nodes" -gt 0 ]; then
  mkdir -p "$out/supernodes"
  for ((i = 0; i < nodes; i++)); do
    key="$out/supernodes/client_$i"
    [ -e "$key" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedhubert client_$i" -f "$key"
  done
fi
echo "wrote $out: ca.crt, server.pem, server.key (for ${san//,/, })$( [ "$nodes" -gt 0 ] && echo "; supernodes/client_0..$((nodes - 1)) key pairs")"
