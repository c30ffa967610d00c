//! A `nats-server -js` child process on loopback: the embedded default of `runner serve` and
//! `runner demo`, and the server every integration test and benchmark starts for itself.
//!
//! It listens on a free port (`-p -1`, the port read from its log), keeps its store in a
//! given directory, and is killed (and reaped) when dropped. It can be stopped and started
//! again on the same port and store, for fault tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NatsServerError {
    #[error("nats-server not found on PATH or in /usr/sbin; install it with `apt-get install -y nats-server`")]
    Missing,
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not become ready within {secs} s; its last output: {log}")]
    NotReady { secs: u64, log: String },
}

/// Finds the `nats-server` binary: `configured`, then `PATH`, then `/usr/sbin`.
pub fn find_binary(configured: Option<&Path>) -> Result<PathBuf, NatsServerError> {
    if let Some(p) = configured {
        return if p.exists() { Ok(p.to_owned()) } else { Err(NatsServerError::Missing) };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    if sbin.is_file() { Ok(sbin) } else { Err(NatsServerError::Missing) }
}

/// A running nats-server child.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    store: PathBuf,
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream, its store under `store`, on a free loopback port.
    pub fn start(binary: Option<&Path>, store: &Path) -> Result<Self, NatsServerError> {
        Self::start_with(binary, store, &[])
    }

    /// [`Self::start`] with extra command-line arguments.
    pub fn start_with(binary: Option<&Path>, store: &Path, extra: &[&str]) -> Result<Self, NatsServerError> {
        let binary = find_binary(binary)?;
        let mut s = Self {
            binary,
            store: store.to_owned(),
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), NatsServerError> {
        let _ = std::fs::create_dir_all(&self.store);
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        let mut cmd = Command::new(&self.binary);
        // The server dies with us, even on SIGKILL (it would otherwise keep our port and store).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(&self.store)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NatsServerError::Spawn { binary: self.binary.clone(), source })?;
        let stderr = child.stderr.take();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        if let Some(stderr) = stderr {
            std::thread::Builder::new()
                .name("nats-server-log".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if tx.send(line).is_err() {
                            // Nobody listens any more: keep draining so the child never blocks.
                            continue;
                        }
                    }
                })
                .ok();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut log = Vec::new();
        let mut port_seen = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NatsServerError::NotReady { secs: 20, log: log.join(" | ") });
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                        port_seen = rest.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                    }
                    let ready = line.contains("Server is ready");
                    log.push(line);
                    if log.len() > 20 {
                        log.remove(0);
                    }
                    if ready && let Some(p) = port_seen {
                        self.port = p;
                        self.child = Some(child);
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(NatsServerError::NotReady {
                            secs: 0,
                            log: format!("exited with {status}: {}", log.join(" | ")),
                        });
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    return Err(NatsServerError::NotReady { secs: 0, log: log.join(" | ") });
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server gracefully (SIGTERM), waiting up to 10 s, then kills it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
