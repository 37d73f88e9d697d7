//! The share coordinator over its raw gRPC protocol, against real brokers: records are
//! acquired once, acknowledged once; stale tokens, double acknowledgements and bad settings
//! are refused and change nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use conveyor_client::proto::*;
use conveyor_tests::share_raw::{RawMember, ack_of, detail};
use conveyor_tests::{BrokerProcess, cli, runtime, stdout};

fn earliest() -> ShareGroupSettings {
    ShareGroupSettings {
        auto_offset_reset: Some("earliest".into()),
        ..Default::default()
    }
}

fn produce(addr: &str, topic: &str, n: usize) {
    let lines: String = (0..n).map(|i| format!("record-{i}\n")).collect();
    let out = cli(addr, &["produce", topic], &lines);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn records_are_acquired_once_and_acknowledged_once() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    let out = cli(&addr, &["topic", "create", "jobs", "--partitions", "2"], "");
    assert!(out.status.success(), "{out:?}");
    produce(&addr, "jobs", 40);
    runtime().block_on(async {
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", earliest())
            .await
            .expect("join a");
        assert_eq!(a.first.partitions, 2);
        let mut b = RawMember::join(&addr, "workers", "b", "", ShareGroupSettings::default())
            .await
            .expect("join b");
        let mut seen = BTreeSet::new();
        let mut held = Vec::new();
        // The fetches and acknowledgements this test makes, which the broker counts.
        let (mut fetches, mut acks) = (0u32, 0u32);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < 40 {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} records acquired",
                seen.len()
            );
            for m in [&mut a, &mut b] {
                let (got, _) = m.fetch(7, Duration::from_millis(200), Vec::new()).await.expect("fetch");
                fetches += 1;
                for r in got {
                    assert!(seen.insert((r.partition, r.offset)), "acquired twice: {r:?}");
                    assert_eq!(r.delivery_count, 1);
                    held.push((m.id.clone(), r));
                }
            }
        }
        // Accept what a holds through b: refused, nothing changes.
        let (_, r) = held.iter().find(|(m, _)| m == "a").expect("a holds something").clone();
        let results = b.ack(vec![ack_of(&r, ShareAckKind::Accept)]).await.expect("ack");
        acks += 1;
        assert_eq!(results[0].error, ErrorCode::StaleDelivery as i32, "{results:?}");
        for (m, r) in &held {
            let member = if m == "a" { &mut a } else { &mut b };
            let results = member.ack(vec![ack_of(r, ShareAckKind::Accept)]).await.expect("ack");
            acks += 1;
            assert_eq!(results[0].error, 0, "{results:?}");
        }
        // Accepting again is refused.
        let (_, r) = &held[0];
        let member = if held[0].0 == "a" { &mut a } else { &mut b };
        let results = member.ack(vec![ack_of(r, ShareAckKind::Accept)]).await.expect("ack");
        acks += 1;
        assert_eq!(results[0].error, ErrorCode::StaleDelivery as i32, "{results:?}");
        let d = a
            .client
            .describe_share_group(DescribeShareGroupRequest {
                group: "workers".into(),
            })
            .await
            .expect("describe")
            .into_inner();
        for p in &d.partitions {
            assert_eq!(Some(p.start_offset), p.log_end_offset, "every record done: {d:?}");
            assert_eq!((p.available, p.acquired), (0, 0), "{d:?}");
        }
        assert_eq!(d.members.len(), 2);
        let (more, _) = a
            .fetch(10, Duration::from_millis(100), Vec::new())
            .await
            .expect("fetch");
        assert!(more.is_empty(), "accepted records delivered again: {more:?}");
        fetches += 1;
        assert_eq!(
            broker.metric("conveyor_share_fetch_requests_total"),
            Some(f64::from(fetches)),
            "share fetches counted"
        );
        assert_eq!(
            broker.metric("conveyor_share_acknowledge_requests_total"),
            Some(f64::from(acks)),
            "share acknowledgements counted"
        );
    });
}

#[test]
fn bad_share_requests_are_refused_and_change_nothing() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    let out = cli(&addr, &["topic", "create", "jobs", "--partitions", "1"], "");
    assert!(out.status.success(), "{out:?}");
    runtime().block_on(async {
        for (settings, words) in [
            (
                ShareGroupSettings {
                    lock_duration_ms: Some(500),
                    ..Default::default()
                },
                "lock_duration_ms",
            ),
            (
                ShareGroupSettings {
                    max_delivery_count: Some(0),
                    ..Default::default()
                },
                "max_delivery_count",
            ),
            (
                ShareGroupSettings {
                    ordering: Some("fifo".into()),
                    ..Default::default()
                },
                "ordering",
            ),
        ] {
            let e = RawMember::join(&addr, "g", "m", "jobs", settings)
                .await
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains(words), "{e:?}");
        }
        let mut client = conveyor_tests::share_raw::shares(&addr).await;
        let e = client
            .describe_share_group(DescribeShareGroupRequest { group: "g".into() })
            .await
            .expect_err("the refused joins created nothing");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert_eq!(detail(&e).code, ErrorCode::UnknownGroup as i32);
        let e = RawMember::join(&addr, "g", "m", "", ShareGroupSettings::default())
            .await
            .expect_err("no topic for a new group");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        let _m = RawMember::join(&addr, "g", "m", "jobs", earliest())
            .await
            .expect("join");
        let e = RawMember::join(
            &addr,
            "g",
            "n",
            "jobs",
            ShareGroupSettings {
                ordering: Some("key".into()),
                ..Default::default()
            },
        )
        .await
        .expect_err("different ordering");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("ordering"), "{e:?}");
    });
}

#[test]
fn a_group_created_ahead_of_its_members_keeps_what_is_produced_after_it_and_refuses_other_settings() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    let out = cli(&addr, &["topic", "create", "jobs", "--partitions", "2"], "");
    assert!(out.status.success(), "{out:?}");
    let out = cli(&addr, &["produce", "jobs"], "before-1\nbefore-2\n");
    assert!(out.status.success(), "{out:?}");
    let create = |extra: &[&str]| {
        let mut args = vec!["queue", "create", "jobs", "--group", "workers", "--output", "json"];
        args.extend_from_slice(extra);
        cli(&addr, &args, "")
    };
    let out = create(&["--lock-duration", "5s"]);
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(answer["created"], true, "{answer}");
    assert_eq!(answer["settings"]["lock_duration_ms"], 5000, "{answer}");
    assert_eq!(answer["settings"]["auto_offset_reset"], "latest", "{answer}");
    // Every partition starts where its log ended when the create answered.
    let out = cli(&addr, &["queue", "describe", "workers", "--output", "json"], "");
    assert!(out.status.success(), "{out:?}");
    let described: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let partitions = described["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 2, "{described}");
    let ends: u64 = partitions
        .iter()
        .map(|p| p["log_end_offset"].as_u64().expect("end"))
        .sum();
    assert!(ends >= 2, "the records produced before are in the logs: {described}");
    for p in partitions {
        assert_eq!(p["start_offset"], p["log_end_offset"], "{described}");
    }
    // Produced with no member yet: a group made by a later join at "latest" would skip them.
    let lines: String = (0..10).map(|i| format!("after-{i}\n")).collect();
    let out = cli(&addr, &["produce", "jobs"], &lines);
    assert!(out.status.success(), "{out:?}");
    let out = cli(
        &addr,
        &[
            "queue",
            "consume",
            "jobs",
            "--group",
            "workers",
            "--max-records",
            "10",
            "--idle-timeout",
            "20s",
            "--output",
            "json",
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let mut got: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v["value"].as_str().expect("value").to_string()
        })
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("after-{i}")).collect();
    want.sort();
    assert_eq!(got, want, "every record produced after the creation, none before");

    let out = create(&["--lock-duration", "5s"]);
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(
        answer["created"], false,
        "the same settings again change nothing: {answer}"
    );
    for (extra, words) in [
        (&["--ordering", "key"][..], "ordering"),
        (&["--max-inflight", "5"][..], "max_inflight_records"),
    ] {
        let out = create(extra);
        assert!(!out.status.success(), "{extra:?} was not refused: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words), "{extra:?}: {err}");
    }
    let out = cli(&addr, &["queue", "create", "nosuch", "--group", "other"], "");
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"), "{out:?}");
    let out = cli(&addr, &["queue", "describe", "other", "--output", "json"], "");
    assert!(!out.status.success(), "a refused create made no group: {out:?}");
    let out = cli(
        &addr,
        &["queue", "create", "jobs", "--group", "fresh", "--max-inflight", "5"],
        "",
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_inflight_records"),
        "{out:?}"
    );
    let out = cli(&addr, &["queue", "describe", "fresh", "--output", "json"], "");
    assert!(!out.status.success(), "a refused create made no group: {out:?}");
}
