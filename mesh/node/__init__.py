"""What runs on a node and what talks to it, shared by pipeline and ensemble modes: the
wire protocol (``mesh.proto``), tensor codec, call authentication and TLS, the node's gRPC
service and ``StageRunner`` (a shard, its request caches and last-stage sampling)."""
