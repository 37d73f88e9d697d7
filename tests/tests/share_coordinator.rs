//! The share coordinator over its raw gRPC protocol, against real brokers: records are
//! acquired once, acknowledged once; stale tokens, double acknowledgements and bad settings
//! are refused and change nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use conveyor_client::proto::*;
use conveyor_tests::cluster::Cluster;
use conveyor_tests::share_raw::{RawMember, ack_of, detail, find_share_coordinator};
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

#[test]
fn a_purge_whose_caller_gave_up_while_the_controller_hung_still_ends_and_dead_letters_go_on() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("jobs", 1, 3, &[]);
    let controller = cluster.wait_for_controller(None);
    let addrs: Vec<String> = cluster
        .ids()
        .iter()
        .map(|id| cluster.broker(*id).addr().to_string())
        .collect();
    let bootstrap = cluster.bootstrap();
    let out = cli(&bootstrap, &["produce", "jobs"], "poison-1\npoison-2\n");
    assert!(out.status.success(), "{out:?}");
    runtime().block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        // A group whose coordinator is not the controller, so the controller can hang
        // while the coordinator answers.
        let controller_addr = cluster.broker(controller).addr().to_string();
        let mut chosen = None;
        for i in 0..64 {
            let group = format!("workers-{i}");
            let at = find_share_coordinator(&addrs, &group, deadline).await;
            if at != controller_addr {
                chosen = Some((group, at));
                break;
            }
        }
        let (group, at) = chosen.expect("some group is coordinated away from the controller");
        let mut a = RawMember::join(&at, &group, "a", "jobs", earliest())
            .await
            .expect("join");
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(std::time::Instant::now() < deadline, "only {got:?} delivered");
            let (more, _) = a.fetch(2, Duration::from_millis(200), Vec::new()).await.expect("fetch");
            got.extend(more);
        }
        got.sort_by_key(|r| r.offset);
        let reject = |r| {
            let mut ack = ack_of(r, ShareAckKind::Reject);
            ack.reason = "poison".into();
            ack
        };
        let results = a.ack(vec![reject(&got[0])]).await.expect("reject");
        assert_eq!(results[0].error, 0, "{results:?}");
        let describe = |client: &mut conveyor_client::proto::shares_client::SharesClient<_>| {
            let request = DescribeShareGroupRequest { group: group.clone() };
            let mut client = client.clone();
            async move {
                client
                    .describe_share_group(request)
                    .await
                    .expect("describe")
                    .into_inner()
            }
        };
        while describe(&mut a.client).await.dead_letters_written < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first dead letter was never written"
            );
            tokio::time::sleep(conveyor_tests::POLL_INTERVAL).await;
        }
        // The purge pauses the group's dead letters, then asks the hung controller to
        // delete their topic; its caller gives up first.
        cluster.broker(controller).pause();
        let mut purge = tonic::Request::new(PurgeDeadLettersRequest { group: group.clone() });
        purge.set_timeout(Duration::from_secs(2));
        let gave_up = a.client.clone().purge_dead_letters(purge).await;
        cluster.broker(controller).resume();
        assert!(
            gave_up.is_err(),
            "the purge answered while the controller hung: {gave_up:?}"
        );
        let results = a.ack(vec![reject(&got[1])]).await.expect("reject");
        assert_eq!(results[0].error, 0, "{results:?}");
        // Left paused, the second would never be written nor archived: the window would
        // not move past it.
        loop {
            let d = describe(&mut a.client).await;
            if d.partitions[0].start_offset == got[1].offset + 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the second dead letter never went: {d:?}"
            );
            tokio::time::sleep(conveyor_tests::POLL_INTERVAL).await;
        }
    });
}
