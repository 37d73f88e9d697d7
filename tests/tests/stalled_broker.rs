//! A broker that stops answering (SIGSTOP) turns into errors on the client, not hangs; once
//! it resumes, the same client works again.

use std::time::Duration;

use conveyor_client::{Client, ClientError, ProducerConfig, ProducerRecord};
use conveyor_tests::{BrokerProcess, cli, runtime};

/// Far above the delivery timeout: the test fails instead of hanging if it is not honoured.
const DEADLINE: Duration = Duration::from_secs(60);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn given_a_stopped_broker_a_producer_should_fail_its_records_in_time_and_recover_after() {
    let broker = BrokerProcess::start();
    assert!(cli(broker.addr(), &["topic", "create", "stall"], "").status.success());
    let rt = runtime();
    let (client, producer) = rt.block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let producer = client
            .producer(ProducerConfig::default().delivery_timeout(DELIVERY_TIMEOUT))
            .expect("producer config");
        let warm = producer
            .send(ProducerRecord::new("stall", "before"))
            .await
            .expect("send");
        warm.await.expect("acknowledged while the broker runs");
        (client, producer)
    });

    broker.pause();
    rt.block_on(async {
        let delivery = producer
            .send(ProducerRecord::new("stall", "while stopped"))
            .await
            .expect("queued");
        let flushed = tokio::time::timeout(DEADLINE, producer.flush()).await;
        assert!(flushed.is_ok(), "flush must end while the broker is stopped");
        match delivery.await {
            Err(ClientError::Timeout(_) | ClientError::Unreachable { .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    });
    broker.resume();

    rt.block_on(async {
        let after = tokio::time::timeout(DEADLINE, async {
            let d = producer.send(ProducerRecord::new("stall", "after")).await?;
            d.await
        })
        .await
        .expect("answered after the broker resumes");
        assert!(after.is_ok(), "the client recovers: {after:?}");
        drop(client);
    });
}
