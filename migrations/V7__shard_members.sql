-- RabbitMQ input shards: every worker process renews its row here each
-- `broker.rabbitmq.member_heartbeat_ms`; the rows seen within three heartbeats are the
-- live members, among which each worker computes the same division of the shards
-- (rendezvous hashing). `scope` names the input the shards belong to (vhost and
-- input exchange), so deployments sharing a database do not mix.
CREATE TABLE shard_members (
    scope    text NOT NULL,
    member   text NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, member)
);
