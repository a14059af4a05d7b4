//! One layered configuration: built-in defaults, then a TOML file, then `SIGNALOPS_`-prefixed
//! environment variables (nested keys joined with `__`, e.g. `SIGNALOPS_INGEST__MAX_BATCH_EVENTS`),
//! then command-line flags, then [`Config::validate`]. `config.default.toml` at the repository root
//! lists every key with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the node keeps its store, its Raft log and (in `dev`) the supervised NATS data.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// Operator token for `/v1/admin`. In `dev` it is generated on first start when unset.
    pub admin_token: Option<String>,
    /// `text` or `json` log lines.
    pub log_format: String,
    pub nats: NatsConfig,
    pub stream: StreamConfig,
    pub ingest: IngestConfig,
    pub rules: RulesConfig,
    pub owners: OwnersConfig,
    pub plugins: PluginsConfig,
    pub notify: NotifyConfig,
    pub cluster: ClusterConfig,
}

/// How a node finds its cluster and what it promises the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster and kept across restarts. Unset: the ordinal at
    /// the end of the host name, as a StatefulSet names its pods (`signalops-2` is node 2);
    /// a host name without one makes node 1.
    pub node_id: Option<u64>,
    /// The nodes that form the cluster the first time it starts. Each of them bootstraps Raft
    /// with exactly this set, so one cluster forms whatever order they start in. Empty: this
    /// node alone. A node not listed never bootstraps: it announces itself and the leader adds
    /// it.
    pub seeds: Vec<u64>,
    /// Most voting members (odd, 1-7). Further nodes join as non-voting members that still own
    /// partitions; a voter that leaves is replaced by one of them.
    pub voters: usize,
    /// How often a node announces itself to the others (its heartbeat), in milliseconds.
    pub heartbeat_ms: u64,
    /// A node not heard from for this long counts as down, in milliseconds.
    pub node_timeout_ms: u64,
    /// The URL the other nodes and clients reach this node's HTTP API at. Unset:
    /// `http://` and the HTTP listen address.
    pub advertise_url: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            seeds: Vec::new(),
            voters: 3,
            heartbeat_ms: 500,
            node_timeout_ms: 5000,
            advertise_url: None,
        }
    }
}

/// The ordinal a StatefulSet puts at the end of a pod's host name: `signalops-2` is 2.
pub fn host_ordinal(host: &str) -> Option<u64> {
    let (_, tail) = host.trim().rsplit_once('-')?;
    if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tail.parse().ok()
}

/// This machine's host name: `HOSTNAME` (set in every Kubernetes pod), else the kernel's.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
}

/// Where partition owners (consume, store, evaluate rules and plugins, ack) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OwnersConfig {
    /// Worker threads of the owners' own runtime (0 = one per core). Their blocking work
    /// (store commits, rule and plugin evaluation) runs on that runtime's blocking threads.
    pub threads: usize,
    /// How much lower the owners' threads run than the rest of the node (added to the
    /// process's nice value, 0-19; 0 = the same priority). When producers and owners want
    /// more CPU than there is, intake goes first: events are durable in JetStream once
    /// acknowledged, and owners catch up when the burst ends.
    pub nice: i32,
}

impl Default for OwnersConfig {
    fn default() -> Self {
        OwnersConfig { threads: 0, nice: 10 }
    }
}

/// Notification delivery (channels, the job stream and its workers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Exceptions to the egress guard: host names and CIDRs that webhook, Slack, Telegram and
    /// plugin requests may reach although they are loopback, private or link-local. Also
    /// `SIGNALOPS_EGRESS_ALLOW` (comma-separated).
    #[serde(deserialize_with = "list_or_csv")]
    pub egress_allow: Vec<String>,
    /// SMTP server for email channels: `smtp://host:port` (plain, or `?tls=required` for
    /// STARTTLS) or `smtps://user:pass@host` (TLS). Also `SIGNALOPS_SMTP_URL`.
    pub smtp_url: Option<String>,
    /// Sender address of notification emails. Also `SIGNALOPS_SMTP_FROM`.
    pub smtp_from: Option<String>,
    /// Telegram Bot API base URL (a channel may set its own).
    pub telegram_api_base_url: String,
    /// Channels per tenant.
    pub max_channels_per_tenant: usize,
    /// Deliveries a node works on at once, over all channels.
    pub max_in_flight: usize,
    /// Deliveries of one channel a node holds (in flight or waiting for the channel's
    /// concurrency); more are handed back to the stream for a second and taken up later.
    pub max_queued_per_channel: usize,
    /// Deliveries of one tenant that may wait in the job stream for a retry at once (per node);
    /// a failed attempt beyond it is dead-lettered at once, so one tenant's failing endpoints
    /// cannot fill the stream every tenant's jobs pass through.
    pub max_retrying_per_tenant: usize,
    /// A channel whose deliveries exhausted every retry this many times in a row is disabled.
    pub disable_after_failed_deliveries: u32,
    /// How long the previous signing secret stays valid after a rotation, seconds (default).
    pub secret_rotation_grace_secs: u64,
    /// JetStream duplicate window of the job stream, seconds.
    pub duplicate_window_secs: u64,
    /// How long dead-lettered jobs are kept, seconds.
    pub dead_letter_max_age_secs: u64,
    /// Finished delivery records (and their attempts) older than this many days are purged.
    pub delivery_retention_days: u64,
    /// How long a job may go without a sign of life from its worker before JetStream offers it
    /// to another worker (after a node crash), seconds. Workers send progress every third of it.
    pub ack_wait_secs: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            egress_allow: Vec::new(),
            smtp_url: None,
            smtp_from: None,
            telegram_api_base_url: "https://api.telegram.org".into(),
            max_channels_per_tenant: 100,
            max_in_flight: 2048,
            max_queued_per_channel: 256,
            max_retrying_per_tenant: 10_000,
            disable_after_failed_deliveries: 5,
            secret_rotation_grace_secs: 24 * 3600,
            duplicate_window_secs: 600,
            dead_letter_max_age_secs: 14 * 86_400,
            delivery_retention_days: 30,
            ack_wait_secs: 60,
        }
    }
}

/// A list, or one comma-separated string (how environment variables give lists).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        One(String),
    }
    Ok(match Form::deserialize(d)? {
        Form::List(l) => l,
        Form::One(s) => s.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect(),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// URL of an external NATS server (`signalops node`). Ignored by `dev`, which runs its own.
    pub url: String,
    /// Client port of the nats-server that `dev` supervises.
    pub port: u16,
    /// Path of the nats-server binary for `dev`; the `NATS_SERVER_BIN` variable and `PATH` are
    /// searched when unset.
    pub server_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Number of event partitions. Fixed when the stream is created; an existing stream keeps its own.
    pub partitions: u32,
    /// JetStream replicas of the event stream (1 for a single server).
    pub replicas: usize,
    /// JetStream deduplication window in seconds (`Nats-Msg-Id`). Must exceed the processing lag
    /// a producer retry can meet; the store's idempotency records cover the long window.
    pub duplicate_window_secs: u64,
    /// Maximum age of events kept in the stream, in seconds (0 keeps them until limits apply).
    pub max_age_secs: u64,
    /// Publish requests without idempotency keys as JetStream fast batches (one
    /// acknowledgement per request; needs nats-server 2.14+, otherwise publishing stays
    /// pipelined). Turns on the stream's `allow_batched` option.
    pub fast_batches: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How long to wait for JetStream to acknowledge a request's events before answering 503.
    pub publish_timeout_ms: u64,
    /// How long an idempotency key keeps deduplicating retries, in seconds.
    pub idempotency_window_secs: u64,
    /// Events per second a tenant may send when its own limit is unset (0 = unlimited).
    pub default_events_per_second: u32,
    /// NATS subject served for ingest (request/reply or plain publish), in a queue group.
    pub nats_subject: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// How far behind a group's newest event an event may be and still count in windows, seconds.
    pub allowed_lateness_secs: u64,
    /// How far past its arrival an event's `occurred_at` may reach; later times are capped, seconds.
    pub max_future_secs: u64,
    /// Groups one rule keeps per partition; events of further groups are counted as dropped.
    pub max_groups_per_rule: usize,
    /// Rules one tenant may have.
    pub max_rules_per_tenant: usize,
    /// How often partition owners checkpoint rule state, milliseconds.
    pub checkpoint_interval_ms: u64,
    /// Checkpoint at the latest after this many log messages of a partition.
    pub checkpoint_events: u64,
    /// How often the leader publishes clock ticks into every partition, milliseconds.
    pub tick_interval_ms: u64,
    /// Most stored events one backtest replays.
    pub max_backtest_events: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            allowed_lateness_secs: 60,
            max_future_secs: 300,
            max_groups_per_rule: 10_000,
            max_rules_per_tenant: 200,
            checkpoint_interval_ms: 1000,
            checkpoint_events: 20_000,
            tick_interval_ms: 1000,
            max_backtest_events: 100_000,
        }
    }
}

/// The WASM plugin sandbox (see sdk/ABI.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Largest module accepted at upload, bytes.
    pub max_module_bytes: usize,
    /// Fuel (about one unit per WebAssembly instruction) one call may use.
    pub fuel_per_call: u64,
    /// Linear memory one instance may grow to, bytes.
    pub max_memory_bytes: usize,
    /// Largest decision a call may return, bytes.
    pub max_output_bytes: usize,
    /// Log lines kept per call.
    pub max_log_lines: usize,
    /// Window counters plus state entries one rule's plugin keeps per partition.
    pub max_state_keys: usize,
    /// Window buckets (one per counter and second) one rule's plugin keeps per partition.
    pub max_window_buckets: usize,
    /// Live instances per partition engine.
    pub max_instances_per_partition: usize,
    /// Instances the node holds at once, for every partition, test run and notification worker
    /// together: the size of the instance pool, whose slots are reused (each reserves about
    /// 4 GiB of address space, not memory). Size it to the partitions a node owns times
    /// `max_instances_per_partition`, plus room for tests and notifiers.
    pub instance_pool: u32,
    /// After this many failed calls in a row, the plugin's rules are disabled.
    pub max_consecutive_failures: u32,
    /// Plugins one tenant may have.
    pub max_plugins_per_tenant: usize,
    /// Events one `POST /v1/plugins/{id}/test` runs.
    pub max_test_events: usize,
}

/// Largest `plugins.instance_pool`: each slot reserves about 4 GiB of address space (so the
/// guest's memory accesses need no bounds checks), and 8,192 of them are a quarter of what a
/// process can map.
const MAX_INSTANCE_POOL: u32 = 8192;

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            max_module_bytes: 4 << 20,
            fuel_per_call: 2_000_000,
            max_memory_bytes: 16 << 20,
            max_output_bytes: 64 << 10,
            max_log_lines: 32,
            max_state_keys: 10_000,
            max_window_buckets: 1_000_000,
            max_instances_per_partition: 64,
            instance_pool: 2048,
            max_consecutive_failures: 10,
            max_plugins_per_tenant: 50,
            max_test_events: 1000,
        }
    }
}

/// What a partition's rule engine is allowed ([`RulesConfig::engine`] derives it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub allowed_lateness_ms: i64,
    pub max_future_ms: i64,
    pub max_groups_per_rule: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { allowed_lateness_ms: 60_000, max_future_ms: 300_000, max_groups_per_rule: 10_000 }
    }
}

impl RulesConfig {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            allowed_lateness_ms: (self.allowed_lateness_secs as i64).saturating_mul(1000),
            max_future_ms: (self.max_future_secs as i64).saturating_mul(1000),
            max_groups_per_rule: self.max_groups_per_rule,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./signalops-data"),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            log_format: "text".into(),
            nats: NatsConfig::default(),
            stream: StreamConfig::default(),
            ingest: IngestConfig::default(),
            rules: RulesConfig::default(),
            owners: OwnersConfig::default(),
            plugins: PluginsConfig::default(),
            notify: NotifyConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig { url: "nats://127.0.0.1:4222".into(), port: 4222, server_bin: None }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { partitions: 16, replicas: 1, duplicate_window_secs: 120, max_age_secs: 0, fast_batches: true }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_batch_events: 1000,
            max_body_bytes: 1024 * 1024,
            publish_timeout_ms: 5000,
            idempotency_window_secs: 24 * 3600,
            default_events_per_second: 0,
            nats_subject: "signalops.v1.ingest".into(),
        }
    }
}

/// Errors in the configuration: they stop the node before it starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Defaults, then the optional TOML file, then `SIGNALOPS_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!("config file {} does not exist", path.display())));
            }
            fig = fig.merge(Toml::file(path));
        }
        // The documented short names of notification settings.
        const SHORT: [(&str, &str); 3] = [
            ("EGRESS_ALLOW", "notify.egress_allow"),
            ("SMTP_URL", "notify.smtp_url"),
            ("SMTP_FROM", "notify.smtp_from"),
        ];
        fig = fig.merge(Env::prefixed("SIGNALOPS_").ignore(&SHORT.map(|(k, _)| k)).split("__"));
        fig = fig.merge(
            Env::prefixed("SIGNALOPS_")
                .only(&SHORT.map(|(k, _)| k))
                .map(|k| SHORT.iter().find(|(s, _)| k == *s).map(|(_, to)| (*to).into()).unwrap_or_else(|| k.into())),
        );
        let cfg: Config = fig.extract().map_err(Box::new)?;
        Ok(cfg)
    }

    /// This node's id: `cluster.node_id`, else the host name's ordinal, else 1.
    pub fn node_id(&self) -> u64 {
        self.cluster.node_id.or_else(|| host_name().as_deref().and_then(host_ordinal)).unwrap_or(1)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.cluster.voters == 0 || self.cluster.voters > 7 || self.cluster.voters.is_multiple_of(2) {
            return bad("cluster.voters must be 1, 3, 5 or 7");
        }
        if self.cluster.heartbeat_ms < 50 || self.cluster.node_timeout_ms < 3 * self.cluster.heartbeat_ms {
            return bad("cluster.heartbeat_ms must be at least 50 and cluster.node_timeout_ms at least 3 heartbeats");
        }
        let mut seeds = self.cluster.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
        if seeds.len() != self.cluster.seeds.len() {
            return bad("cluster.seeds must not repeat a node id");
        }
        if seeds.len() > self.cluster.voters {
            return bad("cluster.seeds may list at most cluster.voters nodes");
        }
        if self.stream.partitions == 0 || self.stream.partitions > 1024 {
            return bad("stream.partitions must be between 1 and 1024");
        }
        if !(0..=19).contains(&self.owners.nice) {
            return bad("owners.nice must be between 0 and 19");
        }
        if self.owners.threads > 256 {
            return bad("owners.threads must be at most 256");
        }
        if self.stream.replicas == 0 || self.stream.replicas > 5 {
            return bad("stream.replicas must be between 1 and 5");
        }
        if self.ingest.max_batch_events == 0 {
            return bad("ingest.max_batch_events must be at least 1");
        }
        if self.ingest.max_body_bytes < 1024 {
            return bad("ingest.max_body_bytes must be at least 1024");
        }
        if self.ingest.publish_timeout_ms == 0 {
            return bad("ingest.publish_timeout_ms must be positive");
        }
        if self.stream.duplicate_window_secs == 0 {
            return bad("stream.duplicate_window_secs must be positive");
        }
        if self.rules.tick_interval_ms < 100 || self.rules.checkpoint_interval_ms < 100 {
            return bad("rules.tick_interval_ms and rules.checkpoint_interval_ms must be at least 100");
        }
        if self.plugins.fuel_per_call < 10_000 || self.plugins.max_memory_bytes < (1 << 16) {
            return bad("plugins.fuel_per_call must be at least 10000 and plugins.max_memory_bytes at least 65536");
        }
        if self.plugins.max_consecutive_failures == 0 || self.plugins.max_instances_per_partition == 0 {
            return bad("plugins.max_consecutive_failures and plugins.max_instances_per_partition must be at least 1");
        }
        if (self.plugins.instance_pool as usize) < self.plugins.max_instances_per_partition
            || self.plugins.instance_pool > MAX_INSTANCE_POOL
        {
            return bad("plugins.instance_pool must be at least plugins.max_instances_per_partition and at most 8192");
        }
        if self.rules.max_groups_per_rule == 0 || self.rules.max_rules_per_tenant == 0 {
            return bad("rules.max_groups_per_rule and rules.max_rules_per_tenant must be at least 1");
        }
        if self.notify.ack_wait_secs < 3 {
            return bad("notify.ack_wait_secs must be at least 3");
        }
        if self.notify.max_in_flight == 0
            || self.notify.max_queued_per_channel == 0
            || self.notify.duplicate_window_secs == 0
        {
            return bad(
                "notify.max_in_flight, notify.max_queued_per_channel and notify.duplicate_window_secs must be positive",
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format must be `text` or `json`");
        }
        if let Some(t) = &self.admin_token {
            if t.len() < 16 {
                return bad("admin_token must be at least 16 characters");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.default.toml` documents every key: it must parse and equal the built-in defaults.
    #[test]
    fn node_ids_come_from_the_host_ordinal() {
        assert_eq!(host_ordinal("signalops-2"), Some(2));
        assert_eq!(host_ordinal("signalops-0\n"), Some(0));
        assert_eq!(host_ordinal("my-signalops-node-12"), Some(12));
        assert_eq!(host_ordinal("signalops"), None);
        assert_eq!(host_ordinal("signalops-"), None);
        assert_eq!(host_ordinal("signalops-2a"), None);
        let mut c = Config::default();
        c.cluster.node_id = Some(7);
        assert_eq!(c.node_id(), 7);
        c.cluster.seeds = vec![1, 2, 3];
        c.validate().unwrap();
        c.cluster.seeds = vec![1, 1];
        assert!(c.validate().is_err());
        c.cluster.seeds = vec![1, 2, 3, 4];
        assert!(c.validate().is_err());
        c.cluster.seeds = vec![];
        c.cluster.voters = 2;
        assert!(c.validate().is_err());
    }

    #[test]
    fn default_file_matches_defaults() {
        let text = include_str!("../../../config.default.toml");
        let from_file: Config = Figment::from(Toml::string(text)).extract().unwrap();
        let defaults = Config::default();
        assert_eq!(serde_json::to_value(&from_file).unwrap(), serde_json::to_value(&defaults).unwrap());
        from_file.validate().unwrap();
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut c = Config::default();
        c.stream.partitions = 0;
        assert!(c.validate().is_err());
        let c = Config { admin_token: Some("short".into()), ..Default::default() };
        assert!(c.validate().is_err());
        let c = Config { log_format: "yaml".into(), ..Default::default() };
        assert!(c.validate().is_err());
        for nice in [-1, 20] {
            let mut c = Config::default();
            c.owners.nice = nice;
            let e = c.validate().expect_err("nice out of range");
            assert!(e.to_string().contains("owners.nice"), "{e}");
        }
        for pool in [0, 63, 8193] {
            let mut c = Config::default();
            c.plugins.instance_pool = pool;
            let e = c.validate().expect_err("instance_pool out of range");
            assert!(e.to_string().contains("plugins.instance_pool"), "{e}");
        }
    }
}
