//! A results table that prints as Markdown and saves as JSON.

use serde::Serialize;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub name: String,
    /// The command line that produced this report.
    pub command: String,
    pub machine: Machine,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
    /// Raw numbers for plots and comparisons.
    pub data: serde_json::Value,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu: String,
    /// `nats-server --version`, when one is installed.
    pub nats_server: String,
    /// The cargo profile the benchmark was built with (`release`-like or `debug`).
    pub build: String,
}

impl Machine {
    pub fn detect() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_owned();
        let nats_server = runner::nats_server::find_binary(None)
            .ok()
            .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "not installed".into());
        let build = if cfg!(debug_assertions) { "debug" } else { "optimised (release or bench-fast)" }.to_owned();
        Self {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel,
            cpu,
            nats_server,
            build,
        }
    }
}

impl Report {
    pub fn new(name: &str, headers: &[&str]) -> Self {
        Self {
            name: name.into(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: Machine::detect(),
            headers: headers.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut s = format!(
            "## {}\n\nmachine: {} cores, kernel {}, {}, {}; build: {}\n\n| {} |\n|{}|\n",
            self.name,
            m.cores,
            m.kernel,
            m.cpu,
            m.nats_server,
            m.build,
            self.headers.join(" | "),
            self.headers.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        for n in &self.notes {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }

    /// The file stem of this report's outputs (`saga-step` for "Saga step").
    pub fn stem(&self) -> String {
        self.name.to_lowercase().replace([' ', '/'], "-")
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join(format!("{}.json", self.stem()));
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(file, json)
    }
}

pub fn fmt_rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// Microseconds as milliseconds with two decimals.
pub fn fmt_ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

pub fn pct(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}
