//! A secret file's value reaches the upstream's header and appears in no log line. The
//! test installs a subscriber that captures every log line of the process at TRACE level.

mod support;

use runner::config::Mode;
use runner::fixture::HttpFixture;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_secret_reaches_the_upstream_and_no_log_line() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    const SECRET: &str = "Bearer s3cr3t-VALUE-7f3a9";
    let h = Harness::new();
    let upstream = HttpFixture::start().unwrap();
    upstream.script(|s| s.fail_next = 1); // one failure, so error paths log too
    let secrets = h.dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("pay_token"), format!("{SECRET}\n")).unwrap();
    let dir = h.dir.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "effects:\n  - name: pay\n    provider: http\n    settings: {{ url: \"{}/pay\", headers: {{ authorization: \"secret:pay_token\" }} }}\n    retry: {{ attempts: 3, backoff_ms: 10, max_backoff_ms: 10, jitter: 0 }}\n",
        upstream.url()
    );
    let mut cfg = h.config(Mode::Effect);
    cfg.saga_manifests = vec![];
    cfg.effect_manifests = vec![write(&dir, "effects.yaml", &yaml)];
    cfg.secrets_dir = secrets;
    let app = h.start(cfg);
    let body = serde_json::json!({"command_id": "s1", "tenant_id": "acme", "effect": "pay", "saga": "order", "correlation_id": "o-1", "payload": {}});
    h.publish("workflow.commands.acme.pay", &[("Nats-Msg-Id", "s1")], &body);
    wait_until(Duration::from_secs(30), "the result", || h.read_stream("WORKFLOW_EVENTS").len() == 1);
    app.shutdown();

    let calls = upstream.records();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.header("authorization") == Some(SECRET)), "the secret did not reach the upstream");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("runner started") && text.contains("effect call failed; retrying"),
        "logs were not captured:\n{text}"
    );
    assert!(!text.contains("s3cr3t-VALUE-7f3a9"), "the secret appeared in the logs");
}
