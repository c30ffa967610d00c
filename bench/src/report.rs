//! A results table that prints as Markdown and saves as JSON.

use serde::Serialize;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub name: String,
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
        Self { cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), kernel, cpu }
    }
}

impl Report {
    pub fn new(name: &str, headers: &[&str]) -> Self {
        Self {
            name: name.into(),
            machine: Machine::detect(),
            headers: headers.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "## {}\n\nmachine: {} cores, kernel {}, {}\n\n| {} |\n|{}|\n",
            self.name,
            self.machine.cores,
            self.machine.kernel,
            self.machine.cpu,
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

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join(format!("{}.json", self.name.to_lowercase().replace(' ', "-")));
        std::fs::write(file, serde_json::to_vec_pretty(self).unwrap_or_default())
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
