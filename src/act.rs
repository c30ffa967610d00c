//! The CLI's verbs that change a running runner, over its operations API: requeue, re-send or
//! discard dead letters, drain, reload. Each shows what it will do and needs `--yes` to do it
//! (`--dry-run` only shows it); the runner's answer is printed as JSON, and a refusal exits 1.

use clap::Args;
use serde_json::Value;
use std::process::ExitCode;

/// Where and how to act.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The running runner's HTTP address, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// Bearer token for the admin endpoints.
    #[arg(long, env = "RUNNER_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Do it (without this the command only says what it would do, and exits 2).
    #[arg(long, conflicts_with = "dry_run")]
    pub yes: bool,
    /// Only show the request.
    #[arg(long)]
    pub dry_run: bool,
}

/// Sends `body` to `path` when `--yes` is given; otherwise shows what would be sent.
pub fn post(target: &Target, path: &str, what: &str, body: Value) -> anyhow::Result<ExitCode> {
    let url = format!("{}{path}", target.url.trim_end_matches('/'));
    if !target.yes {
        eprintln!("would {what}: POST {url} {body}");
        if target.dry_run {
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("add --yes to do it (or --dry-run to only show it)");
        return Ok(ExitCode::from(2));
    }
    let (status, answer) =
        crate::http_client::call_json(hyper::Method::POST, &url, target.token.as_deref(), Some(&body))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if (200..300).contains(&status) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{url} refused ({status})");
        Ok(ExitCode::FAILURE)
    }
}
