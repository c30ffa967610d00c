//! Child processes of the harness: spawned with their output in a log file, a ready line
//! read from stdout with a deadline, stopped with SIGTERM (then SIGKILL at a deadline), and
//! killed and reaped when dropped. Each child also gets SIGKILL when the harness dies
//! (`PR_SET_PDEATHSIG`), so a killed harness leaves no runner, upstream or load behind.

use crate::js::err;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variables of the harness that must not leak into a child (the runner reads
/// `RUNNER_*` as settings and the manifests' `${…}` from the environment).
const SCRUBBED: &[&str] = &["UPSTREAM_URL", "PAYMENTS_URL", "SHIPPING_URL"];

pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Lines the child writes to stdout (read by a thread, so the child never blocks on it).
    lines: Option<flume::Receiver<String>>,
}

/// A command for a child: `program args…`, no inherited `RUNNER_*` or manifest variables.
pub fn command(program: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("RUNNER_") || SCRUBBED.contains(&k.as_str()) {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Proc {
    /// Starts `cmd`; stderr goes to `log`, stdout is read line by line (see [`Self::ready`])
    /// and appended to nothing else.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let file = std::fs::File::create(log).map_err(err("child log file"))?;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // signal fires when the spawning thread ends: children are spawned from the main thread.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        let (tx, rx) = flume::unbounded();
        if let Some(out) = child.stdout.take() {
            std::thread::Builder::new()
                .name(format!("{name}-stdout"))
                .spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        // Nobody listens any more: keep draining so the child never blocks.
                        let _ = tx.send(line);
                    }
                })
                .map_err(err("stdout reader thread"))?;
        }
        Ok(Self { name: name.to_owned(), child: Some(child), log: log.to_owned(), lines: Some(rx) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits for a stdout line starting with `prefix` and returns the rest of it; fails when
    /// the child exits first or `timeout` passes.
    pub fn ready(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let rx = self.lines.clone().ok_or_else(|| format!("{}: no stdout", self.name))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{} not ready within {timeout:?}{}", self.name, self.tail()));
            }
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self.exited()? {
                        return Err(format!("{} exited with {status} before it was ready{}", self.name, self.tail()));
                    }
                }
                Err(flume::RecvTimeoutError::Disconnected) => {
                    let status = self.wait(Duration::from_secs(5))?;
                    return Err(format!("{} exited with {status} before it was ready{}", self.name, self.tail()));
                }
            }
        }
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>, String> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map_err(err("waiting for a child")),
            None => Err(format!("{} was already reaped", self.name)),
        }
    }

    /// Waits for the child to exit on its own, up to `timeout` (then kills it and fails).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("{} did not exit within {timeout:?}; killed{}", self.name, self.tail()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit (SIGKILL after it).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let pid = self.pid();
        if pid != 0 {
            // SAFETY: a signal to our own, not yet reaped child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        self.wait(timeout)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last lines of the child's stderr, for error messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(15);
        if lines.is_empty() {
            String::new()
        } else {
            format!("; last lines of {}:\n{}", self.log.display(), lines[from..].join("\n"))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback TCP port (bound, read, released: the child binds it right after).
pub fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err("free port"))?;
    Ok(l.local_addr().map_err(err("free port"))?.port())
}

/// A blocking HTTP/1.0 GET with a timeout: status and body.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout).map_err(err("connect"))?;
    s.set_read_timeout(Some(timeout)).map_err(err("socket"))?;
    s.set_write_timeout(Some(timeout)).map_err(err("socket"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).map_err(err("request"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(err("response"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: no HTTP status in {:?}", head.chars().take(80).collect::<String>()))?;
    Ok((status, body.to_owned()))
}
