//! The broker's bound on queued produce bytes (`[limits] produce_queue_bytes`, 64 MiB by
//! default) holds for any client: a message takes its share from its gRPC length prefix,
//! before its body is read. When the bound is reached a unary produce is answered BUSY
//! (RESOURCE_EXHAUSTED, retriable) and a produce stream waits, then completes.
//!
//! The bound is filled by raw HTTP/2 clients that send a message's prefix, declaring the
//! largest message the broker accepts, and then nothing more: the broker holds their share
//! until their bodies are late (`[limits] produce_body_timeout` plus the declared length at
//! `produce_body_min_rate`, 74 s by default, well past these tests) and then takes it back.

use std::time::Duration;

use bytes::Bytes;
use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{ErrorCode, ErrorDetail, PartitionProduce, ProduceRequest, Record as PbRecord};
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::{BrokerProcess, cli, poll_for, read_all, runtime};
use prost::Message;

/// The broker's default `[limits] max_request_bytes`: the largest message a staller may
/// declare (a larger one is refused at its prefix and takes no share).
const MAX_REQUEST_BYTES: u32 = 64 << 20;
/// The default `[limits] produce_queue_bytes` is one such message; a second staller makes
/// sure the bound is full even if it were larger.
const STALLERS: usize = 2;
/// Each unary probe waits up to a second for its share; a few of them at most.
const PRESSURE_DEADLINE: Duration = Duration::from_secs(30);

/// A raw HTTP/2 client that sent one produce message's prefix and holds the rest back.
struct Staller {
    _stream: h2::SendStream<Bytes>,
    _response: h2::client::ResponseFuture,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Staller {
    fn drop(&mut self) {
        // Closing the connection resets the stream: the broker drops the unread body.
        self.connection.abort();
    }
}

async fn stall(addr: &str, method: &str) -> Staller {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/conveyor.v1.Produce/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("send headers");
    let mut head = vec![0u8];
    head.extend_from_slice(&MAX_REQUEST_BYTES.to_be_bytes());
    head.extend_from_slice(&[0u8; 1024]);
    stream.send_data(Bytes::from(head), false).expect("send the prefix");
    Staller {
        _stream: stream,
        _response: response,
        connection,
    }
}

fn request(topic: &str, value: &[u8]) -> ProduceRequest {
    ProduceRequest {
        request_id: 1,
        acks: 0,
        partitions: vec![PartitionProduce {
            topic: topic.into(),
            partition: 0,
            records: vec![PbRecord {
                value: Some(Bytes::copy_from_slice(value)),
                ..PbRecord::default()
            }],
            ..PartitionProduce::default()
        }],
    }
}

/// What a unary produce of one 64 KiB record was answered: `Ok(())` or the status code and
/// the broker's error detail.
async fn probe(broker: &BrokerProcess, topic: &str) -> Result<(), (tonic::Code, Option<ErrorDetail>)> {
    let mut client = ProduceClient::connect(format!("http://{}", broker.addr()))
        .await
        .expect("grpc");
    match client.produce(request(topic, &[7u8; 64 << 10])).await {
        Ok(response) => match response.into_inner().partitions.first().and_then(|p| p.error.clone()) {
            None => Ok(()),
            Some(detail) => Err((tonic::Code::Ok, Some(detail))),
        },
        Err(status) => Err((status.code(), ErrorDetail::decode(status.details()).ok())),
    }
}

/// Probes until one unary produce is answered BUSY; panics with the last answer otherwise.
fn until_busy(rt: &tokio::runtime::Runtime, broker: &BrokerProcess, topic: &str) -> ErrorDetail {
    let mut last = None;
    let busy = poll_for(PRESSURE_DEADLINE, || match rt.block_on(probe(broker, topic)) {
        Err((tonic::Code::ResourceExhausted, Some(detail))) if detail.code == ErrorCode::Busy as i32 => Some(detail),
        other => {
            last = Some(other);
            None
        }
    });
    busy.unwrap_or_else(|| {
        panic!("the broker never answered BUSY while its queued-bytes bound was full; last answer: {last:?}")
    })
}

fn create_topic(broker: &BrokerProcess, topic: &str) {
    let out = cli(broker.addr(), &["topic", "create", topic], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn given_queued_produce_bytes_at_their_bound_a_unary_produce_should_be_answered_busy_and_retriable() {
    let broker = BrokerProcess::start();
    create_topic(&broker, "q");
    let rt = runtime();
    rt.block_on(probe(&broker, "q"))
        .expect("a produce succeeds while nothing is queued");

    let stallers: Vec<Staller> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..STALLERS {
            out.push(stall(broker.addr(), "Produce").await);
        }
        out
    });
    let busy = until_busy(&rt, &broker, "q");
    assert!(busy.retriable, "{busy:?}");
    assert!(busy.message.contains("produce_queue_bytes"), "{}", busy.message);
    let held = broker.metric("conveyor_produce_queued_bytes").expect("the gauge");
    assert!(held >= f64::from(MAX_REQUEST_BYTES), "{held}");

    // The clients that held the bound go away: their shares come back, produce works again.
    drop(stallers);
    let answered = poll_for(PRESSURE_DEADLINE, || rt.block_on(probe(&broker, "q")).ok());
    assert!(answered.is_some(), "a produce succeeds once the bound has room again");
    let held = broker.metric("conveyor_produce_queued_bytes").expect("the gauge");
    assert!(held < f64::from(MAX_REQUEST_BYTES), "{held}");
}

#[test]
fn given_queued_produce_bytes_at_their_bound_a_produce_stream_should_wait_then_have_every_record_acknowledged() {
    const RECORDS: usize = 200;
    let broker = BrokerProcess::start();
    create_topic(&broker, "s");
    let rt = runtime();
    let stallers: Vec<Staller> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..STALLERS {
            out.push(stall(broker.addr(), "ProduceStream").await);
        }
        out
    });
    until_busy(&rt, &broker, "s");

    let (_client, producer) = rt.block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let producer = client.producer(ProducerConfig::default()).expect("producer config");
        (client, producer)
    });
    let deliveries: Vec<_> = rt.block_on(async {
        let mut out = Vec::new();
        for i in 0..RECORDS {
            let delivery = producer
                .send(ProducerRecord::new("s", format!("record {i:04}").into_bytes()))
                .await
                .expect("queued");
            out.push(tokio::spawn(delivery));
        }
        out
    });
    // Another probe waits its full second for a share: the stream had that long to get one.
    until_busy(&rt, &broker, "s");
    let early = deliveries.iter().filter(|d| d.is_finished()).count();
    assert_eq!(
        early, 0,
        "no record of the stream may be appended while the bound is full"
    );

    drop(stallers);
    rt.block_on(async {
        for (i, delivery) in deliveries.into_iter().enumerate() {
            let acked = tokio::time::timeout(PRESSURE_DEADLINE, delivery).await;
            match acked {
                Ok(Ok(Ok(_))) => {}
                other => panic!("record {i} was not acknowledged once the bound had room: {other:?}"),
            }
        }
    });
    let observed = rt.block_on(read_all(broker.addr(), "s"));
    // The probes' records are there too; the stream's are those named "record".
    let values: Vec<String> = observed
        .iter()
        .map(|o| o.id.clone())
        .filter(|id| id.starts_with("record "))
        .collect();
    let expected: Vec<String> = (0..RECORDS).map(|i| format!("record {i:04}")).collect();
    assert_eq!(values, expected, "every record once, in order");
}

#[test]
fn given_a_client_that_sends_a_prefix_then_stalls_its_share_should_come_back_after_the_body_deadline() {
    let broker =
        BrokerProcess::start_with_config("[limits]\nproduce_body_timeout = \"2s\"\nproduce_body_min_rate = \"1GiB\"\n");
    create_topic(&broker, "d");
    let rt = runtime();
    let stallers: Vec<Staller> = rt.block_on(async {
        let mut out = Vec::new();
        for method in ["Produce", "ProduceStream"] {
            out.push(stall(broker.addr(), method).await);
        }
        out
    });
    until_busy(&rt, &broker, "d");

    // The stallers keep their connections open and send nothing more: past the deadline the
    // broker fails their requests and produce works again.
    let answered = poll_for(PRESSURE_DEADLINE, || rt.block_on(probe(&broker, "d")).ok());
    assert!(
        answered.is_some(),
        "a produce never succeeded while stalled bodies were past their deadline"
    );
    let held = poll_for(PRESSURE_DEADLINE, || {
        let held = broker.metric("conveyor_produce_queued_bytes").expect("the gauge");
        (held == 0.0).then_some(held)
    });
    assert_eq!(held, Some(0.0), "the stallers' shares came back");
    drop(stallers);
}
