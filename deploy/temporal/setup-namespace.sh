#!/bin/sh
# Waits for the Temporal server, creates the namespace if missing and registers Kernelflow's search
# attributes in it. Idempotent: safe on every `docker compose up`.
#
#   TEMPORAL_ADDRESS               host:port of the frontend (the temporal CLI reads it too)
#   KERNELFLOW_NAMESPACE           namespace to create (default: default)
#   KERNELFLOW_SEARCH_ATTRIBUTES   space-separated Name=Type pairs, Type as the temporal CLI spells it
#   KERNELFLOW_SETUP_ATTEMPTS      tries per step, one second apart (default: 120)
set -eu

: "${TEMPORAL_ADDRESS:?TEMPORAL_ADDRESS must be host:port of the Temporal frontend}"
: "${KERNELFLOW_SEARCH_ATTRIBUTES:?KERNELFLOW_SEARCH_ATTRIBUTES must list Name=Type pairs}"
NAMESPACE=${KERNELFLOW_NAMESPACE:-default}
ATTEMPTS=${KERNELFLOW_SETUP_ATTEMPTS:-120}

# retry DESCRIPTION COMMAND...: runs COMMAND until it succeeds, at most $ATTEMPTS times.
retry() {
  what=$1
  shift
  attempt=1
  until "$@"; do
    if [ "$attempt" -ge "$ATTEMPTS" ]; then
      echo "giving up: $what did not succeed after $ATTEMPTS attempts" >&2
      return 1
    fi
    attempt=$((attempt + 1))
    sleep 1
  done
}

ensure_namespace() {
  temporal operator namespace describe --namespace "$NAMESPACE" >/dev/null 2>&1 \
    || temporal operator namespace create --namespace "$NAMESPACE"
}

echo "waiting for the Temporal server at $TEMPORAL_ADDRESS"
retry "the cluster health check" temporal operator cluster health

echo "ensuring namespace $NAMESPACE"
retry "creating namespace $NAMESPACE" ensure_namespace

for pair in $KERNELFLOW_SEARCH_ATTRIBUTES; do
  name=${pair%%=*}
  type=${pair#*=}
  echo "ensuring search attribute $name ($type) in $NAMESPACE"
  # A new namespace takes a few seconds to reach every server cache, hence the retry. Re-creating an
  # attribute with the same type succeeds; with another type it fails, and so does this script.
  retry "registering search attribute $name" \
    temporal operator search-attribute create --namespace "$NAMESPACE" --name "$name" --type "$type"
done
echo "namespace $NAMESPACE is ready with: $KERNELFLOW_SEARCH_ATTRIBUTES"
