//! The `runner` service: config, CLI, the I/O bridge, effects, HTTP and wiring around the
//! `shards` core.
//!
//! - [`config`]: settings from file and `RUNNER_*` environment, validated; manifests loaded.
//! - [`envelope`]: wire formats and decoding.
//! - [`context`]: state shared by the bridge's tasks, and what other threads see of it.
//! - [`bridge`]: the tokio I/O thread — consumers, dispatch, NATS.
//! - [`crashes`]: messages the process died with, counted across restarts (quarantined
//!   after `consumers.max_crashes`).
//! - [`quarantine`]: dead letters of undecodable messages.
//! - [`effects`]: effect workers, providers, circuit breakers.
//! - [`http_client`]: the outgoing HTTP client (Gateway, effect providers, inspection).
//! - [`nats_server`]: the embedded / test `nats-server` child process.
//! - [`fixture`]: a recording HTTP server (tests, demo upstream and dev Gateway).
//! - [`ops`], [`http`]: health, readiness, metrics, drain, reload, replay, dead letters.
//! - [`serve`], [`demo`], [`inspect`], [`act`], [`cli`]: the commands (`act`: the verbs that
//!   change a running runner).
//! - [`swarm`]: tenant ranges rendered into the Docker Swarm stack.
//! - [`logging`]: pretty or JSON structured logs.
//! - [`placement`]: which CPUs the shards, the bridge and the operations threads take.
//! - [`app`]: starts and stops everything in order.
//!
//! The modules' dependencies form no cycle (`tests/module_graph.rs`).

pub mod act;
pub mod app;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod context;
pub mod crashes;
pub mod demo;
pub mod effects;
pub mod envelope;
pub mod failpoints;
pub mod fixture;
pub mod http;
pub mod http_client;
pub mod inspect;
pub mod logging;
pub mod nats_server;
pub mod ops;
pub mod placement;
pub mod quarantine;
pub mod serve;
pub mod swarm;
