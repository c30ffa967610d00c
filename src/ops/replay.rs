//! The controlled replay's driver, on the operations thread: the shards record the replay
//! (so it survives a crash), then each instance is stepped through its history a page at a
//! time, stream events read back from JetStream by sequence (see `shards::core::replay`).
//! On start, replays left unfinished are resumed.

use super::{Ops, OpsError, OpsResult};
use serde_json::{Value, json};
use shards::keys::SagaKey;
use shards::message::{AdminAnswer, AdminError, AdminOp, Query, ReplayPage, ReplayStep};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How one instance's replay ended.
enum Driven {
    /// Its whole history applied again: this many steps in this request.
    Replayed(u64),
    /// Not replayed (refused, given up and put back as it was, or driven by another request).
    NotReplayed(String),
}

impl Ops {
    /// Controlled replay: without `confirm` only reports what it would reset.
    pub async fn replay(
        &self,
        tenant: String,
        saga: String,
        correlation_id: Option<String>,
        from_seq: u64,
        confirm: bool,
    ) -> OpsResult {
        if !self.manifests().sagas.contains_key(&saga) {
            return Err(OpsError::new(404, format!("saga {saga:?} is not loaded")));
        }
        // What would be reset: instances of the saga for the tenant (or the one instance).
        let instances = match &correlation_id {
            Some(cid) => match self.saga(SagaKey::new(tenant.clone(), saga.clone(), cid.clone())).await {
                Ok(_) => vec![cid.clone()],
                Err(e) if e.status == 404 => Vec::new(),
                Err(e) => return Err(e),
            },
            None => self.instances(&tenant, &saga).await?,
        };
        if !confirm {
            return Err(OpsError::new(
                400,
                format!(
                    "replay needs \"confirm\": true; it would reset {} instance(s) of saga {saga:?} for tenant {tenant:?} and re-apply their events from sequence {from_seq}: {}",
                    instances.len(),
                    instances.join(", ")
                ),
            ));
        }
        // Recorded first on every shard concerned, so a crash from here on resumes it.
        let shards: Vec<usize> = match &correlation_id {
            Some(cid) => {
                let key = SagaKey::new(tenant.clone(), saga.clone(), cid.clone());
                vec![self.router.shard(&key.tenant, key.route())]
            }
            None => (0..self.shards.len()).collect(),
        };
        let mut marked = Vec::new();
        let mut not_replayed = Vec::new();
        for s in shards {
            let op = AdminOp::Replay {
                tenant: tenant.clone(),
                saga: saga.clone(),
                correlation_id: correlation_id.clone(),
                from_seq,
            };
            match self.admin(s, op).await? {
                AdminAnswer::Marked(m) => {
                    marked.extend(m.instances);
                    not_replayed.extend(m.skipped.into_iter().map(|(cid, reason)| not_done(&cid, &reason)));
                }
                other => return Err(unexpected(&other)),
            }
        }
        marked.sort();
        tracing::warn!(tenant = %tenant, saga = %saga, correlation_id = ?correlation_id, from_seq, instances = marked.len(), "controlled replay: re-applying the instances' histories");
        let mut replayed = Vec::new();
        for cid in marked {
            let key = SagaKey::new(tenant.clone(), saga.clone(), cid.clone());
            match self.drive_replay(&key).await? {
                Driven::Replayed(n) => replayed.push(json!({ "correlation_id": cid, "re_applied": n })),
                Driven::NotReplayed(reason) => not_replayed.push(not_done(&cid, &reason)),
            }
        }
        if correlation_id.is_some()
            && replayed.is_empty()
            && let Some(reason) = not_replayed.first().and_then(|v| v["reason"].as_str())
        {
            return Err(OpsError::new(409, reason.to_owned()));
        }
        Ok(json!({ "replayed": replayed, "not_replayed": not_replayed, "from_seq": from_seq }))
    }

    /// Runs the replays left unfinished (a crash, a request that ended early) to their end:
    /// those started first (their keys are held), then the others. Called once at start; it
    /// goes again every 5 s while one could not be driven (a shard not answering).
    pub async fn resume_replays(&self) {
        loop {
            let mut again = false;
            for started in [true, false] {
                for s in 0..self.shards.len() {
                    let mut after: Option<SagaKey> = None;
                    loop {
                        let from = after.clone();
                        let page = match self.ask(s, |reply| Query::Replays { after: from, limit: 256, reply }).await {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::warn!(shard = s, error = %e.reason, "cannot list the replays to resume");
                                again = true;
                                break;
                            }
                        };
                        let Some((last, _)) = page.last() else { break };
                        after = Some(last.clone());
                        for (key, _) in page.into_iter().filter(|(_, begun)| *begun == started) {
                            tracing::warn!(tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, started, "resuming replay");
                            match self.drive_replay(&key).await {
                                Ok(Driven::Replayed(n)) => {
                                    tracing::info!(tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, steps = n, "resumed replay finished")
                                }
                                Ok(Driven::NotReplayed(reason)) => {
                                    tracing::warn!(tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, reason = %reason, "resumed replay not finished")
                                }
                                Err(e) => {
                                    tracing::warn!(tenant = %key.tenant, saga = %key.saga, correlation_id = %key.correlation_id, error = %e.reason, "resumed replay interrupted; trying again");
                                    again = true;
                                }
                            }
                        }
                    }
                }
            }
            if !again {
                return;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    /// Steps one instance through its replay, from where it stands to its end. A history
    /// that cannot be read back or applied again gives the replay up: the instance is put
    /// back as it was and its key released. `Err`: a shard did not answer.
    async fn drive_replay(&self, key: &SagaKey) -> Result<Driven, OpsError> {
        let shard = self.router.shard(&key.tenant, key.route());
        let mut page = match self.admin_raw(shard, AdminOp::ReplayNext { key: key.clone() }).await? {
            Ok(AdminAnswer::Page(p)) => p,
            Ok(other) => return Err(unexpected(&other)),
            Err(e) => return Ok(Driven::NotReplayed(e.to_string())),
        };
        let mut applied = 0;
        while !page.ended {
            let steps = match self.read_back(&page).await {
                Ok(steps) => steps,
                Err(why) => return self.give_up(shard, key, why).await,
            };
            let n = steps.len() as u64;
            match self.admin_raw(shard, AdminOp::ReplaySteps { key: key.clone(), at: page.at, steps }).await? {
                Ok(AdminAnswer::Page(next)) => {
                    applied += n;
                    page = next;
                }
                Ok(other) => return Err(unexpected(&other)),
                // Another request drives it (an operator's, or the resumption at start).
                Err(e @ AdminError::ReplayConflict { .. }) => return Ok(Driven::NotReplayed(e.to_string())),
                Err(e) => return self.give_up(shard, key, e.to_string()).await,
            }
            // A crash point of the fault suite (no-op unless built with `failpoints`).
            fail::fail_point!("replay.after_step");
        }
        Ok(match page.aborted {
            Some(why) => Driven::NotReplayed(why),
            None => Driven::Replayed(applied),
        })
    }

    /// Gives one instance's replay up (the instance is put back as it was).
    async fn give_up(&self, shard: usize, key: &SagaKey, why: String) -> Result<Driven, OpsError> {
        let op = AdminOp::ReplayAbort { key: key.clone(), reason: why.clone() };
        match self.admin_raw(shard, op).await? {
            Ok(_) | Err(AdminError::NoReplay { .. }) => Ok(Driven::NotReplayed(why)),
            Err(e) => Ok(Driven::NotReplayed(format!("{why}; giving it up failed: {e}"))),
        }
    }

    /// The page's steps: each stream event read back from its stream by sequence, the rest
    /// left to the shard.
    async fn read_back(&self, page: &ReplayPage) -> Result<Vec<ReplayStep>, String> {
        let mut streams: HashMap<String, async_nats::jetstream::stream::Stream> = HashMap::new();
        let mut steps = Vec::with_capacity(page.refs.len());
        for r in &page.refs {
            if !r.from_stream() || r.seq < page.from_seq {
                steps.push(ReplayStep::Own);
                continue;
            }
            let (stream, seq) = (r.stream.as_str(), r.seq);
            let cannot = |e: String| format!("cannot read {stream} #{seq} (event {}) back: {e}", r.id);
            if !streams.contains_key(stream) {
                let js = self.js.get().ok_or_else(|| cannot("not connected to JetStream".into()))?;
                let s = js.get_stream(stream).await.map_err(|e| cannot(e.to_string()))?;
                streams.insert(stream.to_owned(), s);
            }
            let Some(s) = streams.get(stream) else { return Err(cannot("no stream".into())) };
            let msg = s.get_raw_message(seq).await.map_err(|e| cannot(e.to_string()))?;
            let headers = msg
                .headers
                .iter()
                .filter_map(|(k, v)| v.first().map(|v| (k.to_string(), v.as_str().to_owned())))
                .collect();
            let t = crate::envelope::Transport {
                stream: stream.to_owned(),
                seq,
                subject: msg.subject.to_string(),
                headers,
                published_ms: (msg.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            };
            let event = if stream == self.cfg.events_stream {
                crate::envelope::decode_result(&msg.payload, &t, self.cfg.max_event_bytes).map(|(_, e)| e)
            } else {
                crate::envelope::decode_aggregate(&msg.payload, &t, self.cfg.tenancy_required, self.cfg.max_event_bytes)
                    .map(|d| d.event)
            }
            .map_err(|e| format!("{stream} #{seq} (event {}) no longer decodes: {e}", r.id))?;
            steps.push(ReplayStep::Event(Arc::new(event)));
        }
        Ok(steps)
    }
}

fn not_done(correlation_id: &str, reason: &str) -> Value {
    json!({ "correlation_id": correlation_id, "reason": reason })
}

fn unexpected(answer: &AdminAnswer) -> OpsError {
    OpsError::new(500, format!("a shard answered a replay with {answer:?}"))
}
