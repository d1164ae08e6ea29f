"""The cluster (``--redis``): membership, the Redis store and its scripts, forwarding
websockets between instances."""
