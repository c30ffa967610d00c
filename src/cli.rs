//! The command line: `runner serve | demo | check | saga get | deadletter list|requeue|resend|
//! discard | outbox stats | drain | resume | reload | swarm render`. `main` only parses and calls one
//! `run`; this file parses and dispatches, each command's own arguments live beside it
//! (`demo::DemoArgs`, `inspect::Source`, `act::Target`).

use crate::config;
use crate::demo::DemoArgs;
use crate::inspect::Source;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "runner",
    version,
    about = "Thread-per-core workflow engine on NATS JetStream: sagas, effects, outbox relay, durable timers",
    long_about = "Runner turns domain events into durable sagas. Settings come from --config (TOML, YAML or JSON) \
                  and RUNNER_* environment variables (RUNNER_NATS__URL sets nats.url). With no nats.url, an \
                  embedded nats-server is started under the data directory."
)]
pub struct Cli {
    /// Settings file (TOML, YAML or JSON, by extension).
    #[arg(long, short, global = true, env = "RUNNER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service until SIGTERM or Ctrl-C (then drain and exit).
    Serve,
    /// Run the order workflow demo on an embedded NATS with a built-in upstream and Gateway,
    /// then print a summary and an exactly-once check (exit 1 if it fails).
    Demo(DemoArgs),
    /// Validate the settings and manifests; print every problem and exit non-zero if any.
    Check,
    /// Saga instances.
    #[command(subcommand)]
    Saga(SagaCmd),
    /// Dead letters.
    #[command(subcommand)]
    Deadletter(DeadletterCmd),
    /// The outbox.
    #[command(subcommand)]
    Outbox(OutboxCmd),
    /// Docker Swarm deployment.
    #[command(subcommand)]
    Swarm(SwarmCmd),
    /// Stop pulling, settle what is in flight, flush the relay (the runner stays up, not ready).
    Drain {
        #[command(flatten)]
        target: crate::act::Target,
    },
    /// End a drain: the consumers bind again and pull; the runner is ready again.
    Resume {
        #[command(flatten)]
        target: crate::act::Target,
    },
    /// Load the configured manifests again; a bad set changes nothing and is reported.
    Reload {
        #[command(flatten)]
        target: crate::act::Target,
    },
}

#[derive(Subcommand)]
pub enum SagaCmd {
    /// List instances of a saga, a page at a time (from a running runner: --url).
    List {
        /// Tenant (empty for single-tenant deployments).
        #[arg(long, default_value = "")]
        tenant: String,
        /// The saga.
        #[arg(long)]
        saga: String,
        /// running, completed or failed.
        #[arg(long)]
        status: Option<String>,
        /// Only parked (true) or only unparked (false) instances.
        #[arg(long)]
        parked: Option<bool>,
        /// Correlation ids starting with this.
        #[arg(long)]
        correlation_prefix: Option<String>,
        /// Continue after this correlation id (the previous page's `next`).
        #[arg(long)]
        cursor: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        source: Source,
    },
    /// Show one instance: state, status, last sequences, pending timers and outbox items.
    Get {
        /// Tenant (`_` or "" for the empty tenant).
        tenant: String,
        /// The saga's name, as in its manifest.
        saga: String,
        /// The instance's correlation id.
        correlation_id: String,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Subcommand)]
pub enum DeadletterCmd {
    /// List dead letters of a tenant, oldest first.
    List {
        /// Tenant (empty for single-tenant deployments).
        #[arg(long, default_value = "")]
        tenant: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        source: Source,
    },
    /// Apply a parked (or quarantined) instance's dead letters again, each once, in order.
    Requeue {
        /// Tenant (empty for single-tenant deployments).
        #[arg(long, default_value = "")]
        tenant: String,
        /// The saga.
        #[arg(long)]
        saga: String,
        /// The instance's correlation id.
        #[arg(long)]
        correlation_id: String,
        /// Drop the poison event itself instead of applying it.
        #[arg(long)]
        skip_poison: bool,
        #[command(flatten)]
        target: crate::act::Target,
    },
    /// Put a failed dispatch back in the outbox (same idempotency key).
    Resend {
        #[command(flatten)]
        letter: LetterArgs,
        #[command(flatten)]
        target: crate::act::Target,
    },
    /// Delete one dead letter.
    Discard {
        #[command(flatten)]
        letter: LetterArgs,
        #[command(flatten)]
        target: crate::act::Target,
    },
}

/// One dead letter, as `deadletter list` shows its key.
#[derive(clap::Args, Clone, Debug)]
pub struct LetterArgs {
    /// Tenant (empty for single-tenant deployments).
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// The letter's `key.at`.
    #[arg(long)]
    pub at: u64,
    /// The letter's `key.id`.
    #[arg(long)]
    pub id: String,
}

#[derive(Subcommand)]
pub enum OutboxCmd {
    /// Outbox depth and store statistics per shard.
    Stats {
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Subcommand)]
pub enum SwarmCmd {
    /// Render the Swarm stack (one service per tenant range) from the ranges file.
    Render {
        /// The tenant-range file.
        #[arg(long, default_value = "swarm/ranges.yaml")]
        ranges: PathBuf,
        /// Write the stack here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::failpoints::install_from_env();
    if !matches!(cli.command, Command::Serve | Command::Demo(_)) {
        // A listing piped into `head` ends quietly when the reader goes, as Unix tools do,
        // instead of panicking on a broken pipe (Rust ignores SIGPIPE by default).
        // SAFETY: sets the default disposition of one signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Serve => {
            let cfg = config::load_from_process(cli.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
            crate::serve::run(cfg)
        }
        Command::Demo(args) => crate::demo::run(cli.config.as_deref(), args),
        Command::Check => crate::inspect::check(cli.config.as_deref()),
        Command::Saga(SagaCmd::List { tenant, saga, status, parked, correlation_prefix, cursor, limit, source }) => {
            crate::inspect::saga_list(
                &source,
                &crate::inspect::ListArgs { tenant, saga, status, parked, correlation_prefix, cursor, limit },
            )
        }
        Command::Saga(SagaCmd::Get { tenant, saga, correlation_id, source }) => {
            crate::inspect::saga_get(cli.config.as_deref(), &source, &tenant, &saga, &correlation_id)
        }
        Command::Deadletter(DeadletterCmd::List { tenant, limit, source }) => {
            crate::inspect::deadletters(cli.config.as_deref(), &source, &tenant, limit)
        }
        Command::Outbox(OutboxCmd::Stats { source }) => crate::inspect::outbox_stats(cli.config.as_deref(), &source),
        Command::Deadletter(DeadletterCmd::Requeue { tenant, saga, correlation_id, skip_poison, target }) => {
            let what = format!("requeue the dead letters of {tenant}/{saga}/{correlation_id}");
            let body = serde_json::json!({"tenant": tenant, "saga": saga, "correlation_id": correlation_id, "skip_poison": skip_poison});
            crate::act::post(&target, "/admin/deadletters/requeue", &what, body)
        }
        Command::Deadletter(DeadletterCmd::Resend { letter, target }) => {
            let what = format!("re-send dead letter {} of tenant {:?}", letter.id, letter.tenant);
            let body = serde_json::json!({"tenant": letter.tenant, "at": letter.at, "id": letter.id});
            crate::act::post(&target, "/admin/deadletters/resend", &what, body)
        }
        Command::Deadletter(DeadletterCmd::Discard { letter, target }) => {
            let what = format!("discard dead letter {} of tenant {:?}", letter.id, letter.tenant);
            let body = serde_json::json!({"tenant": letter.tenant, "at": letter.at, "id": letter.id});
            crate::act::post(&target, "/admin/deadletters/discard", &what, body)
        }
        Command::Drain { target } => {
            crate::act::post(&target, "/admin/drain", "drain the runner", serde_json::json!({}))
        }
        Command::Resume { target } => {
            crate::act::post(&target, "/admin/resume", "resume pulling", serde_json::json!({}))
        }
        Command::Reload { target } => {
            crate::act::post(&target, "/admin/reload", "reload the manifests", serde_json::json!({}))
        }
        Command::Swarm(SwarmCmd::Render { ranges, out }) => crate::swarm::render_command(&ranges, out.as_deref()),
    }
}
