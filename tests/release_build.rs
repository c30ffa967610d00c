//! The shipped binary: `docker/build.sh` (the build step of `docker/Dockerfile`, the only one)
//! builds the release binary with the workspace's release profile, and that binary answers
//! `--help` and passes `runner check` on the example settings and on the image's own config.
//! No Docker engine here, so the image itself is not built; the Dockerfile is held to using
//! that script, to the workspace's toolchain, and to its runtime rules (non-root, health check,
//! data volume, `runner serve`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Runs the built binary with no `RUNNER_*` (nor manifest) variables from the caller.
fn runner(bin: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(root());
    for (k, _) in std::env::vars() {
        if k.starts_with("RUNNER_") || k == "PAYMENTS_URL" || k == "SHIPPING_URL" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Section names of a 64-bit little-endian ELF file.
fn elf_sections(bytes: &[u8]) -> Vec<String> {
    assert!(bytes.len() > 64 && &bytes[..4] == b"\x7fELF", "not an ELF file");
    assert_eq!((bytes[4], bytes[5]), (2, 1), "expected a 64-bit little-endian ELF");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3A), u16_at(0x3C), u16_at(0x3E));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(|i| {
            let start = strtab + u32_at(header(i));
            let end = start + bytes[start..].iter().position(|&b| b == 0).unwrap();
            String::from_utf8_lossy(&bytes[start..end]).into_owned()
        })
        .collect()
}

#[test]
fn the_image_build_script_makes_a_stripped_release_binary_that_checks_the_example_config() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let build = Command::new("sh").arg(root().join("docker/build.sh")).arg(&out).current_dir(root()).output().unwrap();
    assert!(build.status.success(), "docker/build.sh failed:\n{}\n{}", text(&build.stdout), text(&build.stderr));
    let bin = out.join("runner");
    eprintln!("docker/build.sh took {:.0?}", started.elapsed());

    // The release profile strips the binary: no symbol table, no debug info (the parser does
    // see them in the unstripped dev binary cargo built for this test).
    let dev = elf_sections(&std::fs::read(env!("CARGO_BIN_EXE_runner")).unwrap());
    assert!(dev.iter().any(|s| s == ".symtab"), "{dev:?}");
    let sections = elf_sections(&std::fs::read(&bin).unwrap());
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    for gone in [".symtab", ".debug_info", ".debug_line"] {
        assert!(!sections.iter().any(|s| s == gone), "release binary has {gone}: not stripped");
    }

    let help = runner(&bin, &["--help"], &[]);
    assert!(help.status.success(), "runner --help: {}", text(&help.stderr));
    let help = text(&help.stdout);
    for sub in ["serve", "check", "swarm"] {
        assert!(help.contains(sub), "--help lists no `{sub}`:\n{help}");
    }
    let version = runner(&bin, &["--version"], &[]);
    assert!(text(&version.stdout).contains(env!("CARGO_PKG_VERSION")), "{}", text(&version.stdout));

    // `runner check` on settings written here: the example manifests, a scratch data dir.
    let data = tmp.path().join("data");
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("payments_token"), "test-token").unwrap();
    let config = tmp.path().join("runner.toml");
    let examples = root().join("examples/order");
    std::fs::write(
        &config,
        format!(
            "mode = \"combined\"\ndata_dir = {:?}\nshards = 2\n[sagas]\nmanifests = [{:?}]\n[effects]\n\
             manifests = [{:?}]\nsecrets_dir = {:?}\n",
            data,
            examples.join("sagas.yaml"),
            examples.join("effects.yaml"),
            secrets
        ),
    )
    .unwrap();
    let check = runner(&bin, &["check", "--config", config.to_str().unwrap()], &[]);
    assert!(check.status.success(), "runner check failed:\n{}{}", text(&check.stdout), text(&check.stderr));
    let said = text(&check.stdout);
    assert!(said.starts_with("ok"), "{said}");
    assert!(said.contains("order_fulfillment") && said.contains("charge_payment"), "{said}");

    // The image's own config (docker/runner.toml, relative manifest paths as in /app), with the
    // data dir and secrets moved here the way the stack moves them: by RUNNER_* variables.
    let image_check = runner(
        &bin,
        &["check", "--config", "docker/runner.toml"],
        &[("RUNNER_DATA_DIR", &data), ("RUNNER_EFFECTS__SECRETS_DIR", &secrets)],
    );
    let said = text(&image_check.stdout);
    assert!(image_check.status.success(), "check of docker/runner.toml failed:\n{said}{}", text(&image_check.stderr));
    assert!(said.contains("nats://nats:4222"), "{said}");

    // And check does check: a bad setting fails, naming the field.
    std::fs::write(&config, "shards = 0\n").unwrap();
    let bad = runner(&bin, &["check", "--config", config.to_str().unwrap()], &[]);
    assert!(!bad.status.success(), "check accepted shards = 0");
    assert!(text(&bad.stderr).contains("shards"), "{}", text(&bad.stderr));
    eprintln!("release build test took {:.0?}", started.elapsed());
}

/// `(instruction, arguments)` of each Dockerfile line, continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (ins, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((ins.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

#[test]
fn the_dockerfile_builds_only_through_the_shared_script_and_runs_unprivileged() {
    let dockerfile = read("docker/Dockerfile");
    let ins = instructions(&dockerfile);
    let cargo: serde_json::Value = {
        use figment::providers::{Format, Toml};
        Toml::from_str(&read("Cargo.toml")).expect("Cargo.toml")
    };

    // The release profile the issue asks for (and the image and the test share).
    let release = &cargo["profile"]["release"];
    assert_eq!(release["lto"], "fat");
    assert_eq!(release["codegen-units"], 1);
    assert_eq!(release["strip"], true);

    // Toolchain: the workspace's rust-version, on the same Debian release as the runtime (glibc).
    let rust_version = cargo["workspace"]["package"]["rust-version"].as_str().unwrap();
    assert!(ins.contains(&("ARG".into(), format!("RUST_VERSION={rust_version}"))), "{ins:?}");
    let froms: Vec<&String> = ins.iter().filter(|(i, _)| i == "FROM").map(|(_, a)| a).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert_eq!(froms[0], "rust:${RUST_VERSION}-bookworm AS build");
    assert!(froms[1].starts_with("debian:bookworm-slim"), "minimal runtime on the build's glibc: {}", froms[1]);

    // The build is docker/build.sh and nothing else; the script is the one the test above runs.
    let runs: Vec<&String> = ins.iter().filter(|(i, _)| i == "RUN").map(|(_, a)| a).collect();
    let builds: Vec<&&String> = runs.iter().filter(|r| r.contains("docker/build.sh")).collect();
    assert_eq!(builds.len(), 1, "{runs:?}");
    assert!(builds[0].ends_with("sh docker/build.sh /out"), "{}", builds[0]);
    for r in &runs {
        assert!(!r.contains("cargo build") && !r.contains("rustc "), "build step outside docker/build.sh: {r}");
    }
    let script = read("docker/build.sh");
    let cargo_lines: Vec<&str> = script.lines().filter(|l| l.trim_start().starts_with("cargo ")).collect();
    assert_eq!(cargo_lines, ["cargo build --release --locked --bin runner"]);
    assert!(ins.contains(&("COPY".into(), "--from=build /out/runner /usr/local/bin/runner".into())));

    // Every workspace member reaches the build stage (cargo reads them all), and the lock file.
    let copies: Vec<&String> = ins.iter().filter(|(i, _)| i == "COPY").map(|(_, a)| a).collect();
    let copied = |path: &str| copies.iter().any(|c| c.split_whitespace().any(|p| p == path));
    assert!(copied("Cargo.lock") && copied("Cargo.toml") && copied("src"), "{copies:?}");
    for member in cargo["workspace"]["members"].as_array().unwrap() {
        let m = member.as_str().unwrap();
        if m == "." {
            continue;
        }
        assert!(copied(m) || copied(&format!("{m}/Cargo.toml")), "workspace member {m} is not copied: {copies:?}");
    }

    // Runtime: non-root (the uid the stack mounts secrets for), data volume, health on /health,
    // config file by RUNNER_CONFIG, `runner serve` by default.
    let uid = runner::swarm::RUNTIME_UID;
    assert_eq!(ins.iter().rfind(|(i, _)| i == "USER").map(|(_, a)| a.as_str()), Some(format!("{uid}:{uid}").as_str()));
    assert!(dockerfile.contains(&format!("--uid {uid}")), "creates the user with uid {uid}");
    assert!(ins.contains(&("VOLUME".into(), "[\"/data\"]".into())));
    let health = ins.iter().find(|(i, _)| i == "HEALTHCHECK").map(|(_, a)| a.clone()).expect("a HEALTHCHECK");
    assert!(health.contains(&format!("http://127.0.0.1:{}/health", runner::swarm::HTTP_PORT)), "{health}");
    assert!(health.contains("CMD [\"curl\", \"--fail\""), "exec form, failing on HTTP errors: {health}");
    assert!(ins.contains(&("ENV".into(), "RUNNER_CONFIG=/etc/runner/runner.toml".into())));
    assert!(ins.contains(&("COPY".into(), "docker/runner.toml /etc/runner/runner.toml".into())));
    assert!(ins.contains(&("WORKDIR".into(), "/app".into())), "relative manifest paths resolve under /app");
    assert!(ins.contains(&("COPY".into(), "examples /app/examples".into())));
    assert!(ins.contains(&("ENTRYPOINT".into(), "[\"/usr/local/bin/runner\"]".into())));
    assert_eq!(ins.last(), Some(&("CMD".into(), "[\"serve\"]".into())));

    // The image's config listens where the health check and Prometheus look.
    let cfg = runner::config::load(Some(&root().join("docker/runner.toml")), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.http_addr.to_string(), format!("0.0.0.0:{}", runner::swarm::HTTP_PORT));
    assert_eq!(cfg.data_dir, Path::new(runner::swarm::DATA_DIR));
    assert!(cfg.drain_deadline_ms < 30_000, "compose's stop_grace_period (30 s) must exceed the drain deadline");
}
