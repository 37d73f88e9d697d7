//! Produce a few keyed records and read them back.
//!
//! Start a broker first (`cargo run --release --bin conveyor-broker`), then:
//! `cargo run -p conveyor-client --example quickstart [BROKER]`

use std::time::Duration;

use conveyor_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, StartAt};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9292".into());
    let client = Client::connect(&broker).await?;

    let topic = "quickstart-deliveries";
    if client.admin().describe_topic(topic).await.is_err() {
        client
            .admin()
            .create_topic(topic, 3, &[("retention.ms", "86400000")])
            .await?;
    }

    let producer = client.producer(ProducerConfig::default())?;
    let mut deliveries = Vec::new();
    for drone in 1..=5 {
        let record = ProducerRecord::new(topic, format!("drone {drone} dispatched")).key(format!("drone-{drone}"));
        deliveries.push(producer.send(record).await?);
    }
    producer.flush().await?;
    for delivery in deliveries {
        let written = delivery.await?;
        println!(
            "written to partition {} at offset {:?}",
            written.partition, written.offset
        );
    }

    let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(200)));
    consumer.assign_all(topic, StartAt::Earliest).await?;
    let mut records = consumer.stream();
    for _ in 0..5 {
        let Some(record) = records.next().await else { break };
        let record = record?;
        let value = record.value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
        println!("read partition {} offset {}: {value}", record.partition, record.offset);
    }
    Ok(())
}
