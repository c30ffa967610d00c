//! The benchmark harness in quick mode, as the test suite runs it so it cannot rot: every
//! workload runs against a real nats-server, prints its table, and writes JSON and plots
//! with sane (non-zero) numbers. Performance is not asserted here: see bench/README.md.

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_runner-bench"))
        .args(["--quick", "--no-progress"])
        .args(args)
        .output()
        .expect("runner-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "runner-bench {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    stdout
}

fn json(dir: &Path, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

/// A Markdown table with a header, a separator and at least `rows` rows follows `heading`.
fn table_after(stdout: &str, heading: &str, rows: usize) {
    let start = stdout.find(heading).unwrap_or_else(|| panic!("no {heading:?} in:\n{stdout}"));
    let lines: Vec<&str> =
        stdout[start..].lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).collect();
    assert!(lines.len() >= rows + 2, "{heading}: table too short:\n{}", lines.join("\n"));
    assert!(lines[1].starts_with("|---"), "{heading}: no separator line");
}

#[test]
fn quick_all_prints_every_table_with_sane_numbers_and_writes_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let stdout = run(&["--out", out.to_str().unwrap(), "all"]);
    for (heading, rows) in [
        ("## Saga step", 6),
        ("## Order workflow", 4),
        ("## Shard scaling", 5),
        ("## Backlog drain", 5),
        ("## Durability modes", 3),
        ("## Order workflow in separate processes", 3),
        ("## Goals", 9),
    ] {
        table_after(&stdout, heading, rows);
    }
    assert!(stdout.contains("nats-server"), "the machine line names the nats-server version");

    let step = json(&out, "saga-step.json");
    assert!(step["command"].as_str().unwrap().contains("all"));
    let raw = positive(&step["data"]["raw_median"], "raw steps/s");
    let saga = positive(&step["data"]["saga_median"], "saga steps/s");
    assert!((positive(&step["data"]["ratio"], "ratio") - saga / raw).abs() < 1e-9);
    let lat = step["data"]["latency"].as_array().unwrap();
    assert_eq!(lat.len(), 4, "raw and saga at 25% and 50% of peak");
    for l in lat {
        positive(&l["count"], "latency samples");
        let (p50, p99, max) =
            (positive(&l["p50_us"], "p50"), positive(&l["p99_us"], "p99"), positive(&l["max_us"], "max"));
        assert!(p50 <= p99 && p99 <= max, "{l}");
    }

    let wf = json(&out, "order-workflow.json");
    positive(&wf["data"]["peak_orders_per_s"], "peak orders/s");
    let runs = wf["data"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "peak, then 25/50/100% of it");
    for r in runs {
        positive(&r["achieved_per_s"], "completed orders/s");
        positive(&r["p99_us"], "order p99");
    }

    let sc = json(&out, "shard-scaling.json");
    let rows = sc["data"]["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["stage"] == "shard pipeline (in-process)"));
    assert!(rows.iter().any(|r| r["stage"] == "saga step end to end"));
    for r in rows {
        positive(&r["rate"], "scaling rate");
        positive(&r["efficiency"], "scaling efficiency");
    }

    let bl = json(&out, "backlog-drain.json");
    positive(&bl["data"]["drain_per_s"], "drain rate");
    positive(&bl["data"]["peak_vm_rss_kib"], "peak RSS");
    assert!(bl["data"]["samples"].as_array().unwrap().len() >= 2);

    let du = json(&out, "durability-modes.json");
    let modes: Vec<_> = du["data"]["rows"].as_array().unwrap().iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["fsync", "no_meta_sync", "no_sync"]);
    for r in du["data"]["rows"].as_array().unwrap() {
        positive(&r["pipeline_per_s"], "pipeline rate");
        positive(&r["step_per_s"], "step rate");
    }

    for plot in ["saga-step-latency.svg", "order-workflow-latency.svg", "shard-scaling.svg", "backlog-rss.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{plot} is not a line chart");
    }
    orders_report(&out, &["runner", "nats-server", "upstream", "load"]);
    let goals = json(&out, "goals.json");
    let rows = goals["rows"].as_array().unwrap();
    assert!(rows.len() >= 9);
    // Quick loads are not the loads: its goal rows say so rather than guess.
    assert!(rows.iter().any(|r| r[0].as_str().unwrap().contains("256 in flight (issue 16)") && r[2] == "not measured"));
}

#[test]
fn quick_store_pipeline_and_raw_print_their_tables() {
    let stdout = run(&["store"]);
    table_after(&stdout, "## Store", 4);
    let stdout = run(&["pipeline"]);
    table_after(&stdout, "## Pipeline", 6);
    assert!(stdout.contains("throughput (fsync)"));
    let stdout = run(&["raw"]);
    table_after(&stdout, "## Raw JetStream step", 1);
    let rate = stdout.lines().find(|l| l.starts_with("| 3000 |")).expect("raw row");
    assert!(!rate.contains("| 0 |"), "{rate}");
}

/// Checks one `orders` report: every order of every run completed, the exactly-once check
/// passed, and the numbers are sane.
fn orders_report(out: &Path, processes: &[&str]) {
    let r = json(out, "order-workflow-in-separate-processes.json");
    positive(&r["data"]["raw_steps_per_s"], "raw JetStream baseline");
    let runs = r["data"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "a closed loop and one open-loop rate: {runs:?}");
    assert!(runs[0]["closed_in_flight"].as_u64().is_some() && runs[1]["offered_per_s"].as_f64().is_some());
    for run in runs {
        let label = run["label"].as_str().unwrap();
        let orders = run["orders"].as_u64().unwrap();
        assert!(orders >= 100, "{label}: {orders} orders");
        assert_eq!(run["completed"].as_u64(), Some(orders), "{label}: every order made its final call");
        let eo = &run["exactly_once"];
        assert_eq!(run["exactly_once_passed"], true, "{label}: {eo}");
        assert_eq!(eo["orders"].as_u64(), Some(orders), "{label}");
        assert!(eo["declined"].as_u64().unwrap() > 0, "{label}: some payments declined and compensated: {eo}");
        // Good orders make 3 calls, declined ones 4 (http) or 3 (gateway), plus duplicates.
        assert!(eo["calls"].as_u64().unwrap() >= 3 * orders, "{label}: {eo}");
        assert!(run["problem"].is_null(), "{label}: {}", run["problem"]);
        positive(&run["orders_per_s"], "orders/s");
        let (p50, p90, p99, max) = (
            positive(&run["p50_us"], "p50"),
            positive(&run["p90_us"], "p90"),
            positive(&run["p99_us"], "p99"),
            positive(&run["max_us"], "max"),
        );
        assert!(p50 <= p90 && p90 <= p99 && p99 <= max, "{run}");
        positive(&run["commits_per_order"], "commits per order");
        for p in processes {
            assert!(run["cpu"][p]["us_per_order"].as_f64().is_some(), "{label}: no CPU for {p}: {}", run["cpu"]);
        }
        let threads = run["runner_threads"].as_object().unwrap();
        assert!(threads.keys().any(|t| t.starts_with("shard")), "{label}: runner threads {threads:?}");
    }
}

#[test]
fn quick_orders_runs_every_party_in_its_own_process_and_every_order_happens_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("http");
    let stdout = run(&["--out", out.to_str().unwrap(), "orders"]);
    // Shown only when the test fails.
    eprintln!("{stdout}");
    table_after(&stdout, "## Order workflow in separate processes", 3);
    assert!(stdout.contains("| pass"), "{stdout}");
    orders_report(&out, &["runner", "nats-server", "upstream", "load"]);
    let svg = std::fs::read_to_string(out.join("orders-latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));

    // The original example: Reserve through the Gateway process.
    let out = dir.path().join("gateway");
    let stdout = run(&["--out", out.to_str().unwrap(), "orders", "--flow", "gateway"]);
    eprintln!("{stdout}");
    table_after(&stdout, "## Order workflow in separate processes", 3);
    orders_report(&out, &["runner", "nats-server", "upstream", "gateway", "load"]);
}
