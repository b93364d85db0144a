"""The request log: every request and response (primary, shadow, fallback; successful or not) as one
msgpack record in LMDB segments, committed before the answer is sent, readable while the gateway runs."""
