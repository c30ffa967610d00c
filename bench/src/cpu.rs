//! CPU time by thread of this process and of nats-server, from `/proc` (user + system),
//! to show where the time of an end-to-end run goes.

use std::collections::BTreeMap;

/// Clock ticks per second of `/proc/*/stat` (USER_HZ: 100 on Linux, fixed by its ABI).
const TICKS: f64 = 100.0;

/// utime + stime of one `/proc/.../stat` line, in seconds, and the thread's name.
fn parse_stat(text: &str) -> Option<(String, f64)> {
    // The name is in parentheses and may contain spaces; the fields after it are fixed.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / TICKS))
}

/// CPU seconds the calling thread used so far.
pub fn this_thread() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|t| parse_stat(&t)).map(|(_, s)| s).unwrap_or(0.0)
}

/// CPU seconds a process used so far (every thread, also those that ended), `None` when it
/// is gone.
pub fn process(pid: u32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|t| parse_stat(&t)).map(|(_, s)| s)
}

/// CPU seconds of each live thread of a process, summed by thread name (`shard-0` and
/// `shard-1` stay apart; several `tokio-runtime-w` threads add up).
pub fn threads(pid: u32) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            if let Some((name, secs)) = std::fs::read_to_string(e.path().join("stat")).ok().and_then(|t| parse_stat(&t))
            {
                *m.entry(name).or_insert(0.0) += secs;
            }
        }
    }
    m
}

/// CPU seconds of this process's threads, grouped by name with trailing digits dropped
/// (`shard-0`, `shard-1` → `shard-`), plus `nats-server` for the server's process.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub BTreeMap<String, f64>);

impl Snapshot {
    pub fn take(nats_pid: Option<u32>) -> Self {
        let mut m = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for e in dir.flatten() {
                if let Some((name, secs)) =
                    std::fs::read_to_string(e.path().join("stat")).ok().and_then(|t| parse_stat(&t))
                {
                    let key = name.trim_end_matches(|c: char| c.is_ascii_digit()).to_owned();
                    *m.entry(key).or_insert(0.0) += secs;
                }
            }
        }
        if let Some(pid) = nats_pid
            && let Some((_, secs)) =
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|t| parse_stat(&t))
        {
            m.insert("nats-server".into(), secs);
        }
        Self(m)
    }

    /// What each group used since `before` (threads that ended in between are not counted).
    pub fn since(&self, before: &Snapshot) -> Snapshot {
        Snapshot(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), (v - before.0.get(k).copied().unwrap_or(0.0)).max(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .collect(),
        )
    }

    pub fn total(&self) -> f64 {
        self.0.values().sum()
    }

    /// `name µs/step` for every group, largest first, per `steps`.
    pub fn per_step(&self, steps: u64) -> String {
        let mut v: Vec<_> = self.0.iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        v.iter()
            .map(|(k, s)| format!("{} {:.1}", k.trim_end_matches('-'), *s * 1e6 / steps.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn json(&self, steps: u64) -> serde_json::Value {
        serde_json::Value::Object(
            self.0.iter().map(|(k, s)| (k.clone(), serde_json::json!(*s * 1e6 / steps.max(1) as f64))).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_names_with_spaces() {
        let line = "123 (tokio runtime w) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(super::parse_stat(line), Some(("tokio runtime w".into(), 3.0)));
    }
}
