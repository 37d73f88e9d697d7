//! Unit tests of the sender: what a reset and a late fence do to the sender's state.

use super::*;

fn stamped_batch(sequencer: &mut Sequencer, seal_seq: u64, records: u32) -> Sealed {
    let mut b = conveyor_storage::batch::BatchBuilder::new(conveyor_storage::batch::Compression::None);
    for _ in 0..records {
        b.push(&conveyor_storage::batch::Record {
            timestamp: 1,
            value: Some(bytes::Bytes::from_static(b"r")),
            ..Default::default()
        });
    }
    let mut batch = Sealed::for_test(Arc::from("t"), 0, b.build().expect("build"), records, seal_seq);
    assert!(matches!(sequencer.stamp(&mut batch), Stamp::Ready));
    batch.sent = true;
    batch
}

fn fenced() -> ClientError {
    ClientError::from_detail(pb::ErrorDetail {
        code: ErrorCode::ProducerFenced as i32,
        message: "fenced".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_reset_counts_renumbered_sent_records_and_a_fence_of_the_left_epoch_fails_only_its_batch() {
    let (_fake, address) = super::super::fake_broker_tests::start_fake().await;
    let client = Client::connect(&address).await.expect("connect");
    let status = Arc::new(Status::default());
    let (ids, _issued) = mpsc::channel(1);
    let mut state = State::new(client, ProducerConfig::default(), Arc::clone(&status), ids);
    let sequencer = state.sequencer.as_mut().expect("idempotent by default");
    sequencer.issued(ProducerIdentity {
        producer_id: 7,
        producer_epoch: 0,
    });
    // `late` stands for a copy given up on under epoch 0; `waiting` was sent too and is
    // renumbered by the reset.
    let late = stamped_batch(sequencer, 0, 3);
    let waiting = stamped_batch(sequencer, 1, 2);
    sequencer.refused_for_good(&late, ResetCause::Gap);
    state.queue.push_back(waiting);
    state.reset_idle_partitions();
    assert_eq!(status.unvouched(), 2, "the records of the sent batch renumbered");

    let outcome = late.outcome();
    state.retry_or_fail(late, fenced());
    assert!(status.stopped().is_none(), "{:?}", status.stopped());
    let e = outcome().expect("resolved").expect_err("fenced");
    assert_eq!(e.code(), Some(ErrorCode::ProducerFenced));

    // Under the partition's current epoch a fence stops the producer.
    let mut renumbered = state.queue.pop_front().expect("waiting");
    let sequencer = state.sequencer.as_mut().expect("idempotent");
    assert!(matches!(sequencer.stamp(&mut renumbered), Stamp::Ready));
    assert_eq!(
        renumbered
            .producer
            .map(|p| (p.producer_id, p.producer_epoch, p.base_sequence)),
        Some((7, 1, 0))
    );
    state.retry_or_fail(renumbered, fenced());
    let stopped = status.stopped().expect("stopped");
    assert_eq!(stopped.code(), Some(ErrorCode::ProducerFenced), "{stopped}");
}
