//! `runner check` and read-only inspection: from a data directory (opened read-only, a
//! stopped or running runner) or from a running runner's HTTP endpoints.

use clap::Args;
use serde_json::{Value, json};
use shards::keys::SagaKey;
use shards::layout::{DataDir, shard_path};
use shards::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where inspection reads from.
#[derive(Args, Clone, Debug)]
pub struct Source {
    /// A stopped (or running) runner's data directory: read directly, read-only.
    #[arg(long, conflicts_with = "url")]
    pub data: Option<PathBuf>,
    /// A running runner's HTTP address, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer token for the admin endpoints (when reading over HTTP).
    #[arg(long, env = "RUNNER_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Validates settings and manifests; prints every problem.
pub fn check(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match crate::config::load_from_process(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match crate::config::load_manifests(&cfg) {
        Ok(set) => {
            println!(
                "ok: mode {:?}, {} shard(s), data {}, nats {}, {} saga(s) [{}], {} effect(s) [{}]",
                cfg.mode,
                cfg.shards,
                cfg.data_dir.display(),
                cfg.nats_url.as_deref().unwrap_or("embedded"),
                set.sagas.len(),
                set.sagas.keys().cloned().collect::<Vec<_>>().join(", "),
                set.effects.len(),
                set.effects.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print(v: &Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

/// The shard stores of a data directory, opened read-only.
fn stores(data: &Path) -> anyhow::Result<(DataDir, Vec<Store>)> {
    let root = data.join("shards");
    let layout = DataDir::inspect(&root)?
        .ok_or_else(|| anyhow::anyhow!("{} is not a runner data directory (no shards/layout.json)", data.display()))?;
    let dir = DataDir::prepare_read_only(&root, layout);
    let stores =
        (0..layout.shards).map(|i| Store::open_read_only(&shard_path(&root, i), i)).collect::<Result<Vec<_>, _>>()?;
    Ok((dir, stores))
}

fn data_dir(config: Option<&Path>, source: &Source) -> anyhow::Result<PathBuf> {
    if let Some(d) = &source.data {
        return Ok(d.clone());
    }
    let cfg = crate::config::load_from_process(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cfg.data_dir)
}

fn http_get(source: &Source, path: &str) -> anyhow::Result<(u16, Value)> {
    let Some(base) = &source.url else { anyhow::bail!("no --url") };
    let url = format!("{}{path}", base.trim_end_matches('/'));
    crate::http_client::call_json(hyper::Method::GET, &url, source.token.as_deref(), None)
}

fn http_print(source: &Source, path: &str) -> anyhow::Result<ExitCode> {
    let (status, v) = http_get(source, path)?;
    print(&v)?;
    Ok(if (200..300).contains(&status) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What `saga list` asks for.
pub struct ListArgs {
    pub tenant: String,
    pub saga: String,
    pub status: Option<String>,
    pub parked: Option<bool>,
    pub correlation_prefix: Option<String>,
    pub cursor: Option<String>,
    pub limit: usize,
}

/// `runner saga list`: one page from a running runner's `GET /sagas`.
pub fn saga_list(source: &Source, args: &ListArgs) -> anyhow::Result<ExitCode> {
    if source.url.is_none() {
        anyhow::bail!("saga list reads a running runner: pass --url (e.g. http://127.0.0.1:8080)");
    }
    let mut q = format!("/sagas?tenant={}&saga={}&limit={}", enc(&args.tenant), enc(&args.saga), args.limit);
    for (name, value) in [
        ("status", args.status.clone()),
        ("parked", args.parked.map(|p| p.to_string())),
        ("correlation_prefix", args.correlation_prefix.clone()),
        ("cursor", args.cursor.clone()),
    ] {
        if let Some(v) = value {
            q.push_str(&format!("&{name}={}", enc(&v)));
        }
    }
    http_print(source, &q)
}

pub fn saga_get(
    config: Option<&Path>,
    source: &Source,
    tenant: &str,
    saga: &str,
    cid: &str,
) -> anyhow::Result<ExitCode> {
    if source.url.is_some() {
        let t = if tenant.is_empty() { "_".to_owned() } else { enc(tenant) };
        return http_print(source, &format!("/sagas/{t}/{}/{}", enc(saga), enc(cid)));
    }
    let data = data_dir(config, source)?;
    let (dir, stores) = stores(&data)?;
    let key = SagaKey::new(tenant, saga, cid);
    key.validate()?;
    let shard = dir.router().shard(tenant, key.route());
    let view = stores[shard].read()?;
    let Some(rec) = view.saga(&key)? else {
        eprintln!("no saga instance for {key} in {}", data.display());
        return Ok(ExitCode::FAILURE);
    };
    let timers: Vec<Value> = view
        .schedules_of(&key)?
        .into_iter()
        .map(|(k, e)| json!({"timer_id": k.timer_id, "due_at": k.due_at, "name": e.name}))
        .collect();
    let partition = dir.router().partition(tenant, key.route());
    let outbox: Vec<Value> = view
        .outbox(None, usize::MAX)?
        .into_iter()
        .filter(|(k, i)| k.partition == partition && i.saga == saga && i.correlation_id == cid)
        .map(|(_, i)| serde_json::to_value(i))
        .collect::<Result<_, _>>()?;
    let mut v = serde_json::to_value(&rec)?;
    if let Value::Object(m) = &mut v {
        m.insert("tenant".into(), tenant.into());
        m.insert("saga".into(), saga.into());
        m.insert("correlation_id".into(), cid.into());
        m.insert("shard".into(), shard.into());
        m.insert("pending_timers".into(), Value::Array(timers));
        m.insert("pending_outbox".into(), Value::Array(outbox));
    }
    print(&v)
}

pub fn deadletters(config: Option<&Path>, source: &Source, tenant: &str, limit: usize) -> anyhow::Result<ExitCode> {
    if source.url.is_some() {
        return http_print(source, &format!("/admin/deadletters?tenant={}&limit={limit}", enc(tenant)));
    }
    let data = data_dir(config, source)?;
    let (_, stores) = stores(&data)?;
    let mut all = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        for (k, l) in s.read()?.deadletters(tenant, None, limit)? {
            let mut v = serde_json::to_value(&l)?;
            if let Value::Object(m) = &mut v {
                m.insert("key".into(), json!({"tenant": k.tenant, "at": k.at, "id": k.id}));
                m.insert("shard".into(), i.into());
            }
            all.push(v);
        }
    }
    all.sort_by_key(|l| l["at"].as_u64().unwrap_or(0));
    all.truncate(limit);
    print(&json!({ "tenant": tenant, "count": all.len(), "deadletters": all }))
}

pub fn outbox_stats(config: Option<&Path>, source: &Source) -> anyhow::Result<ExitCode> {
    if source.url.is_some() {
        return http_print(source, "/admin/stats");
    }
    let data = data_dir(config, source)?;
    let (dir, stores) = stores(&data)?;
    let mut shards = Vec::new();
    let mut total = 0;
    for (i, s) in stores.iter().enumerate() {
        let v = s.read()?;
        let stats = v.stats()?;
        let oldest = v.outbox(None, 1)?.first().map(|(_, item)| item.created_at);
        total += stats.outbox;
        shards.push(json!({ "shard": i, "outbox": stats.outbox, "oldest_outbox_item_at": oldest, "store": stats }));
    }
    print(&json!({ "partitions": dir.router().partitions(), "outbox_total": total, "shards": shards }))
}
