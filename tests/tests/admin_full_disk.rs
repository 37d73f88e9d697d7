//! An admin call that fails on a full disk leaves nothing half-done: what it answered is what
//! the broker shows afterwards, before and after a restart.

use conveyor_tests::{BrokerProcess, cli};

/// Whether `topic describe` finds `topic` on `broker`.
fn topic_exists(broker: &BrokerProcess, topic: &str) -> bool {
    let out = cli(broker.addr(), &["topic", "describe", topic, "--output", "json"], "");
    out.status.success()
}

#[test]
fn given_a_full_disk_a_failed_topic_create_should_not_appear_later() {
    let mut broker = BrokerProcess::start();
    assert!(cli(broker.addr(), &["topic", "create", "before"], "").status.success());

    broker.disk_full();
    let t = std::time::Instant::now();
    let out = cli(broker.addr(), &["topic", "create", "orders"], "");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("create on a full disk: {:?} {stderr} after {:?}", out.status, t.elapsed());
    broker.disk_has_space();
    let before = topic_exists(&broker, "orders");
    eprintln!("exists before restart: {before}");
    eprintln!("FIRST LOG {}", broker.log().lines().filter(|l| !l.contains("slog")).collect::<Vec<_>>().join("\n"));
    let t = std::time::Instant::now();
    broker.terminate();
    eprintln!("terminated after {:?}", t.elapsed());
    broker.restart();
    let after = topic_exists(&broker, "orders");
    eprintln!("exists after restart: {after}");
    eprintln!("{}", broker.log());
    panic!("explore");
}
