//! Metric names: one place for every crate, `signalops_` prefix, units in the suffix.

/// Ingest requests, labels `transport` (http|nats) and `outcome` (ok|status code).
pub const INGEST_REQUESTS: &str = "signalops_ingest_requests_total";
/// Ingested events, labels `transport` and `outcome` (accepted|duplicate|rejected|failed).
pub const INGEST_EVENTS: &str = "signalops_ingest_events_total";
/// Time from request received to response, label `transport`.
pub const INGEST_DURATION: &str = "signalops_ingest_duration_seconds";
/// Time from first publish to last JetStream ack of one request.
pub const PUBLISH_DURATION: &str = "signalops_jetstream_publish_duration_seconds";
/// Requests' events published to JetStream, label `mode`: `fast_batch` (one acknowledgement for
/// the request) or `pipelined` (one per event).
pub const PUBLISHES: &str = "signalops_jetstream_publishes_total";
/// Messages not yet processed per partition (consumer pending), label `partition`.
pub const CONSUMER_LAG: &str = "signalops_consumer_lag";
/// Events written to the store for the first time.
pub const EVENTS_STORED: &str = "signalops_events_stored_total";
/// Redelivered or re-published events skipped by the store.
pub const EVENTS_SKIPPED: &str = "signalops_events_skipped_total";
/// Log messages a partition owner could not decode, label `reason`.
pub const EVENTS_UNDECODABLE: &str = "signalops_events_undecodable_total";
/// Failures of plain (no reply subject) NATS ingest publishes, label `status`.
pub const NATS_PUBLISH_FAILURES: &str = "signalops_nats_ingest_failures_total";
/// Failed store writes by partition owners (retried).
pub const STORE_ERRORS: &str = "signalops_store_errors_total";
/// Time from event accepted to stored.
pub const ACCEPT_TO_STORE: &str = "signalops_accept_to_store_seconds";

/// Alerts fired by rules.
pub const ALERTS_FIRED: &str = "signalops_alerts_fired_total";
/// Alerts resolved.
pub const ALERTS_RESOLVED: &str = "signalops_alerts_resolved_total";
/// Events too late for a rule's window (still stored and counted in series).
pub const RULE_LATE_EVENTS: &str = "signalops_rule_late_events_total";
/// Events not evaluated because their rule reached its group limit.
pub const RULE_GROUPS_DROPPED: &str = "signalops_rule_groups_dropped_total";
/// Time to evaluate one batch of a partition against its rules.
pub const RULES_BATCH_DURATION: &str = "signalops_rules_batch_duration_seconds";
/// Plugin calls, by tenant and plugin.
pub const PLUGIN_CALLS: &str = "signalops_plugin_calls_total";
/// Failed plugin calls, by tenant, plugin and kind (trap, fuel_exhausted, memory_limit, ...).
pub const PLUGIN_FAILURES: &str = "signalops_plugin_failures_total";
/// Time of one plugin call, by tenant and plugin.
pub const PLUGIN_CALL_DURATION: &str = "signalops_plugin_call_duration_seconds";
/// Engine checkpoints written.
pub const RULE_CHECKPOINTS: &str = "signalops_rule_checkpoints_total";
/// Notification jobs queued by partition owners.
pub const NOTIFY_JOBS_QUEUED: &str = "signalops_notify_jobs_queued_total";
/// Delivery attempts, labels `kind` (webhook|slack|telegram|email) and `outcome` (ok|failed).
pub const NOTIFY_ATTEMPTS: &str = "signalops_notify_attempts_total";
/// Finished deliveries, label `status` (delivered|failed).
pub const NOTIFY_DELIVERIES: &str = "signalops_notify_deliveries_total";
/// Time of one delivery attempt, label `kind`.
pub const NOTIFY_ATTEMPT_DURATION: &str = "signalops_notify_attempt_duration_seconds";
/// Time from an alert's transition being queued to its successful delivery.
pub const NOTIFY_QUEUE_TO_DELIVERED: &str = "signalops_notify_queue_to_delivered_seconds";
/// Channels the node disabled (410 Gone or repeated exhausted deliveries).
pub const NOTIFY_CHANNELS_DISABLED: &str = "signalops_notify_channels_disabled_total";

/// Partition moves the leader made (joins, departures, rebalancing).
pub const PARTITION_MOVES: &str = "signalops_partition_moves_total";
/// Partitions this node owns (runs the owners of).
pub const OWNED_PARTITIONS: &str = "signalops_owned_partitions";
/// Raft leader changes this node saw.
pub const LEADER_CHANGES: &str = "signalops_leader_changes_total";
/// Effects the store refused because a newer owner of their partition had committed (a
/// deposed owner's late commits).
pub const FENCED_COMMITS: &str = "signalops_fenced_commits_total";
