//! `signalops`: parse the command line, load config, set up logging, run the node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use signalops::node::{self, Mode};
use signalops_core::config::Config;

// mimalloc: the ingest and processing paths allocate many small objects (JSON values, keys);
// glibc malloc showed up as ~15% of CPU in the ingest benchmark. Built without transparent
// huge pages (`no_thp`): with them, every fresh allocator page faulted in and zeroed 2 MiB,
// which took 6-9 % of the node's CPU under sustained ingest (store write batches and per-batch
// maps are large, short-lived allocations).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "signalops", version, about = "SignalOps: act on business events")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a single-node development setup: supervised nats-server, embedded store, one-node
    /// Raft, and a dev tenant whose credentials are printed and saved.
    Dev(Flags),
    /// Run a node against an external NATS (`nats.url`).
    Node(Flags),
}

#[derive(Args)]
struct Flags {
    /// TOML config file (see config.default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Client port of the supervised nats-server (dev).
    #[arg(long)]
    nats_port: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mode, flags) = match cli.command {
        Commands::Dev(f) => (Mode::Dev, f),
        Commands::Node(f) => (Mode::Node, f),
    };
    let mut cfg = match Config::load(flags.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("signalops: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(d) = flags.data_dir {
        cfg.data_dir = d;
    }
    if let Some(h) = flags.http {
        cfg.http = h;
    }
    if let Some(p) = flags.nats_port {
        cfg.nats.port = p;
    }
    signalops::telemetry::init_logging(&cfg.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("signalops: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.http)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.http))?;
        node::run(cfg, mode, listener, node::shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("signalops: {e:#}");
            ExitCode::FAILURE
        }
    }
}
