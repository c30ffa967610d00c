//! Streams and durable consumers.

use crate::config::{Config, durable_name};
use crate::crashes::Unsettled;
use async_nats::jetstream::{self, consumer, stream};
use std::time::Duration;

/// Creates the workflow streams (and the aggregate stream) when missing.
pub async fn ensure_streams(js: &jetstream::Context, cfg: &Config) -> Result<(), async_nats::Error> {
    let window = Duration::from_millis(cfg.duplicate_window_ms);
    let specs = [
        (cfg.aggregate_stream.clone(), cfg.aggregate_subjects.clone()),
        (cfg.commands_stream.clone(), vec!["workflow.commands.>".to_owned()]),
        (cfg.events_stream.clone(), vec!["workflow.events.>".to_owned(), "workflow.timers.>".to_owned()]),
    ];
    for (name, subjects) in specs {
        let config = stream::Config {
            name: name.clone(),
            subjects,
            storage: stream::StorageType::File,
            duplicate_window: window,
            num_replicas: cfg.replicas,
            ..Default::default()
        };
        match js.get_stream(&name).await {
            Ok(_) => {}
            Err(_) => {
                js.get_or_create_stream(config).await?;
                tracing::info!(stream = %name, "created stream");
            }
        }
    }
    Ok(())
}

/// Binds (creating when missing) a durable pull consumer, restarting its delivery at its
/// ack floor when it has un-acked messages.
///
/// Why: JetStream redelivers a message that was delivered but never acked (the previous
/// process crashed, stopped, or lost its connection) only after `ack_wait`, while newer
/// messages flow at once. A newer event of the same key would then be applied first and the
/// old one skipped by the sequence gate — lost. Re-creating the consumer at `ack floor + 1`
/// redelivers every un-acked message in stream order before anything newer; messages acked
/// above the floor come again and the sequence gate skips them.
pub async fn pull_consumer(
    js: &jetstream::Context,
    cfg: &Config,
    stream_name: &str,
    role: &str,
    filter: &str,
) -> Result<consumer::Consumer<consumer::pull::Config>, async_nats::Error> {
    Ok(bind(js, cfg, stream_name, role, filter).await?.0)
}

/// [`pull_consumer`], also telling what the consumer had delivered and not settled (a
/// process that died had those in flight). Re-creating the consumer resets JetStream's
/// delivery counts, so this is read before.
pub async fn bind(
    js: &jetstream::Context,
    cfg: &Config,
    stream_name: &str,
    role: &str,
    filter: &str,
) -> Result<(consumer::Consumer<consumer::pull::Config>, Unsettled), async_nats::Error> {
    let stream = js.get_stream(stream_name).await?;
    let name = durable_name(&cfg.durable_prefix, role, filter);
    let mut config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: filter.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_millis(cfg.ack_wait_ms),
        max_deliver: cfg.max_deliver,
        max_ack_pending: cfg.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let mut unsettled = Unsettled::default();
    if let Ok(info) = stream.consumer_info(&name).await {
        let floor = info.ack_floor.stream_sequence;
        unsettled = Unsettled { floor, upto: floor };
        if info.num_ack_pending == 0 {
            return Ok((stream.get_consumer(&name).await?, unsettled));
        }
        unsettled.upto = info.delivered.stream_sequence;
        let start = floor + 1;
        tracing::info!(stream = stream_name, consumer = %name, pending = info.num_ack_pending, start, "restarting delivery at the ack floor");
        stream.delete_consumer(&name).await?;
        config.deliver_policy = consumer::DeliverPolicy::ByStartSequence { start_sequence: start };
    }
    Ok((stream.get_or_create_consumer(&name, config).await?, unsettled))
}
